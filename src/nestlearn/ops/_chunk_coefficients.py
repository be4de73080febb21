"""The gate coefficients of a deep-memory chunk, as one autograd node with a written backward.

Within a chunk of C tokens (local tokens 1..C, gradients at the chunk-start weights W_{t'}):

    W_t = A_t W_{t'} + s_t S_{t'} - sum_{i<=t} c_{t,i} e_i a_i^T,
    S_t = Theta_t S_{t'} - sum_{i<=t} (Theta_t / Theta_i) eta_i e_i a_i^T,

with A_t, Theta_t cumulative products of the retention gate alpha and the momentum gate theta
(docs/paper.md section 4; derivation in ``ops/README.md``, "Deep MLP memory"). Every
coefficient is read from the segment products ``P`` of alpha and ``Q`` of theta
(``segment_products``: ``P[p, s]`` is the product of the gates of tokens s..p-1):

    scale[t] = A_t = P[t+1, 0],             eta_decay[t, i] = (A_t / A_i) eta_i = P[t+1, i+1] eta_i,
    coef[t, i] = c_{t,i} = (P[:, 1:] Q[1:, :])[t+1, i+1] eta_i   (eta_decay without momentum),
    carry[t] = s_t = (P[:, 1:] Q[1:, :])[t+1, 0],

the ``prev_*`` twins one token earlier (row t holds t - 1, which the delta rule needs), and
the ``end_*`` rows at the chunk's last token, which the chunk-end state step reads (with
``end_momentum[i] = (Theta_C / Theta_i) eta_i`` and ``theta_end = Theta_C``).

Why one node: autograd of these few lines records some fifty small ops per chunk (a slice of
``P`` or of the mixed product per coefficient, each slice's backward a zero-filled full-size
gradient, a multiplication and a reduction per broadcast), and the chunk step runs once per
chunk per memory per block. The written backward collects every incoming gradient into one
buffer per source with in-place row additions, then needs two products and the segment
products' own backward: about half the ops. ``tests/test_ops_chunk_coefficients.py`` checks it
against autograd of the plain expressions in float64 (gradcheck, gates at exactly 0 and 1).
"""

from __future__ import annotations

from typing import Any

import torch

from nestlearn.ops._chunking import _products_backward, _products_forward, segment_products
from nestlearn.ops._first_order import check_first_order

# Output order of the node; ``momentum`` adds the mixed-product coefficients, ``previous`` the
# one-token-earlier twins.
_PLAIN = ("scale", "eta_decay", "end_scale", "end_eta_decay")
_PREVIOUS = ("prev_scale", "prev_eta_decay")
_MOMENTUM = ("coef", "carry", "end_coef", "end_carry", "end_momentum", "theta_end")
_MOMENTUM_PREVIOUS = ("prev_coef", "prev_carry")


def _names(previous: bool, momentum: bool) -> tuple[str, ...]:
    return (_PLAIN + (_PREVIOUS if previous else ())
            + (_MOMENTUM + (_MOMENTUM_PREVIOUS if previous else ()) if momentum else ()))


class ChunkCoefficients:
    """The coefficients of one chunk (or of N chunks, gates ``[..., N, C]``), as attributes.

    Matrices are ``[..., C, C]`` (row t, column i), vectors ``[..., C]``, ``end_*`` rows
    ``[..., C]`` and ``end_scale``, ``end_carry``, ``theta_end`` ``[...]``. Without momentum
    ``coef`` is ``eta_decay`` (and ``prev_coef``, ``end_coef`` likewise), and ``carry``,
    ``end_momentum``, ``theta_end`` are None; without ``previous`` the ``prev_*`` are None.
    """

    scale: torch.Tensor
    eta_decay: torch.Tensor
    coef: torch.Tensor
    carry: torch.Tensor | None
    prev_scale: torch.Tensor | None
    prev_eta_decay: torch.Tensor | None
    prev_coef: torch.Tensor | None
    prev_carry: torch.Tensor | None
    end_scale: torch.Tensor
    end_eta_decay: torch.Tensor
    end_coef: torch.Tensor
    end_carry: torch.Tensor | None
    end_momentum: torch.Tensor | None
    theta_end: torch.Tensor | None
    momentum: bool  # whether theta was given

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        for name in _names(True, True):
            setattr(self, name, values.get(name))
        self.momentum = self.coef is not None
        if not self.momentum:  # one step of plain gradient descent per token
            self.coef, self.prev_coef = self.eta_decay, self.prev_eta_decay
            self.end_coef = self.end_eta_decay

    def per_chunk(self, dim: int = 2) -> list[ChunkCoefficients]:
        """Coefficients computed for N chunks at once as one object per chunk (``unbind`` of
        the chunk axis ``dim``; its backward is one stacking per coefficient)."""
        values = {name: getattr(self, name) for name in _names(True, True)
                  if getattr(self, name) is not None}
        if not self.momentum:  # the aliases are rebuilt per chunk
            values = {name: value for name, value in values.items()
                      if name not in ("coef", "prev_coef", "end_coef")}
        parts = {name: value.unbind(dim) for name, value in values.items()}
        count = len(parts["scale"])
        return [ChunkCoefficients({name: part[index] for name, part in parts.items()})
                for index in range(count)]


def chunk_coefficients(alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None,
                       previous: bool, momentum_products: torch.Tensor | None = None
                       ) -> ChunkCoefficients:
    """The coefficients of a chunk with gates ``alpha``, ``eta``, ``theta`` ``[..., C]``
    (theta None: no momentum). ``previous``: also the one-token-earlier twins (the delta
    rule's). ``momentum_products``: theta's segment products ``[..., C + 1, C + 1]`` when the
    caller has them already (computed for every chunk at once)."""
    momentum = theta is not None
    if momentum and momentum_products is None:
        momentum_products = segment_products(theta)
    outputs = _Coefficients.apply(alpha, eta, momentum_products if momentum else None,
                                  previous)
    return ChunkCoefficients(dict(zip(_names(previous, momentum), outputs, strict=True)))


def _coefficients(products: torch.Tensor, eta: torch.Tensor, momentum: torch.Tensor | None,
                  previous: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The node's outputs (in ``_names`` order) and the mixed product ``P[:, 1:] Q[1:, :]``."""
    eta_cols = eta[..., None, :]
    cols = products[..., 1:]
    out = [products[..., 1:, 0], cols[..., 1:, :] * eta_cols, products[..., -1, 0],
           cols[..., -1, :] * eta]
    if previous:
        out += [products[..., :-1, 0], cols[..., :-1, :] * eta_cols]
    if momentum is None:
        return tuple(out), None
    mixed = cols @ momentum[..., 1:, :]  # [..., C + 1, C + 1]
    mixed_cols = mixed[..., 1:]
    out += [mixed_cols[..., 1:, :] * eta_cols, mixed[..., 1:, 0], mixed_cols[..., -1, :] * eta,
            mixed[..., -1, 0], momentum[..., -1, 1:] * eta, momentum[..., -1, 0]]
    if previous:
        out += [mixed_cols[..., :-1, :] * eta_cols, mixed[..., :-1, 0]]
    return tuple(out), mixed


def _by_position(lead: torch.Size, size: int, now: torch.Tensor | None,
                 prev: torch.Tensor | None, end: torch.Tensor | None) -> torch.Tensor | None:
    """One gradient ``[..., C + 1, W]`` indexed by position from the gradients of rows that
    read position t + 1 (``now`` ``[..., C, W]``), position t (``prev``) and position C
    (``end`` ``[..., W]``); None when none of them arrived."""
    if now is None and prev is None and end is None:
        return None
    # the first gradient padded to every position, the others added in place (.add_ on the
    # row view: `view += x` would also copy the view back onto itself)
    if now is not None:
        total = torch.nn.functional.pad(now, (0, 0, 1, 0))
    elif prev is not None:
        total, prev = torch.nn.functional.pad(prev, (0, 0, 0, 1)), None
    else:
        total = end.new_zeros(*lead, size + 1, end.shape[-1])
    if prev is not None:
        total[..., :-1, :].add_(prev)
    if end is not None:
        total[..., -1, :].add_(end)
    return total


class _Gradients:
    """The gradients that reached the node's outputs, gathered by position."""

    def __init__(self, names: tuple[str, ...], grads: tuple[torch.Tensor | None, ...],
                 eta: torch.Tensor) -> None:
        self.grads = dict(zip(names, grads, strict=True))
        self.lead, self.size = eta.shape[:-1], eta.shape[-1]

    def get(self, name: str) -> torch.Tensor | None:
        return self.grads.get(name)

    def matrix(self, name: str) -> torch.Tensor | None:
        """``[..., C + 1, C]`` from ``name``, ``prev_name`` and ``end_name``."""
        return _by_position(self.lead, self.size, self.get(name), self.get(f"prev_{name}"),
                            self.get(f"end_{name}"))

    def column(self, name: str) -> torch.Tensor | None:
        """``[..., C + 1, 1]`` from the vectors ``name``, ``prev_name`` and ``end_name``."""
        now, prev, end = (self.get(n) for n in (name, f"prev_{name}", f"end_{name}"))
        return _by_position(self.lead, self.size, None if now is None else now[..., None],
                            None if prev is None else prev[..., None],
                            None if end is None else end[..., None])


class _Coefficients(torch.autograd.Function):
    """``(alpha, eta, Q, previous) -> the coefficients in _names order`` (Q, theta's segment
    products, None without momentum), with the backward described in the module docstring.
    Reverse mode, first order only."""

    @staticmethod
    def forward(ctx: Any, alpha: torch.Tensor, eta: torch.Tensor,
                momentum: torch.Tensor | None, previous: bool) -> tuple[torch.Tensor, ...]:
        products = _products_forward(alpha)
        outputs, mixed = _coefficients(products, eta, momentum, previous)
        ctx.save_for_backward(products, eta, momentum, mixed)
        ctx.names = _names(previous, momentum is not None)
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        check_first_order("the deep memory's chunk coefficients")
        products, eta, momentum, mixed = ctx.saved_tensors
        need_alpha, need_eta, need_momentum, _ = ctx.needs_input_grad
        g = _Gradients(ctx.names, grads, eta)
        cols = products[..., 1:]
        eta_parts: list[torch.Tensor] = []  # dL/deta, summed once at the end
        col_parts: list[torch.Tensor] = []  # dL/dP[:, 1:]
        decayed = g.matrix("eta_decay")  # eta_decay = P[:, 1:] eta, by position
        if decayed is not None:
            if need_alpha:
                col_parts.append(decayed * eta[..., None, :])
            if need_eta:
                eta_parts.append((decayed * cols).sum(-2))
        grad_momentum = None
        if momentum is not None:
            grad_momentum = _momentum_gradients(g, cols, eta, momentum, mixed, need_alpha,
                                                need_eta, need_momentum, eta_parts, col_parts)
        grad_alpha = None
        start = g.column("scale") if need_alpha else None  # dL/dP[:, 0]
        if start is not None or col_parts:
            if start is None:
                start = eta.new_zeros(*g.lead, g.size + 1, 1)
            grad_cols = (_total(col_parts) if col_parts
                         else eta.new_zeros(*g.lead, g.size + 1, g.size))
            grad_alpha = _products_backward(products, torch.cat([start, grad_cols], -1))
        return grad_alpha, _total(eta_parts) if eta_parts else None, grad_momentum, None


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _momentum_gradients(g: _Gradients, cols: torch.Tensor, eta: torch.Tensor,
                        momentum: torch.Tensor, mixed: torch.Tensor, need_alpha: bool,
                        need_eta: bool, need_momentum: bool, eta_parts: list[torch.Tensor],
                        col_parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The momentum coefficients' share: dL/dQ (returned), and their parts of dL/deta and
    dL/dP[:, 1:] (appended). ``mixed = P[:, 1:] Q[1:, :]``: coef its columns 1.. times eta,
    carry its column 0; end_momentum = Q[C, 1:] eta, theta_end = Q[C, 0]."""
    mixed_rows, carried = g.matrix("coef"), g.column("carry")
    if mixed_rows is not None and need_eta:
        eta_parts.append((mixed_rows * mixed[..., 1:]).sum(-2))
    grad_momentum = None
    if (mixed_rows is not None or carried is not None) and (need_alpha or need_momentum):
        if carried is None:
            carried = eta.new_zeros(*g.lead, g.size + 1, 1)
        scaled = (mixed_rows * eta[..., None, :] if mixed_rows is not None
                  else eta.new_zeros(*g.lead, g.size + 1, g.size))
        mixed_grad = torch.cat([carried, scaled], -1)  # dL/dmixed
        if need_alpha:
            col_parts.append(mixed_grad @ momentum[..., 1:, :].transpose(-1, -2))
        if need_momentum:
            grad_momentum = torch.nn.functional.pad(cols.transpose(-1, -2) @ mixed_grad,
                                                    (0, 0, 1, 0))
    end_momentum, theta_end = g.get("end_momentum"), g.get("theta_end")
    if end_momentum is not None and need_eta:
        eta_parts.append(end_momentum * momentum[..., -1, 1:])
    if need_momentum and (end_momentum is not None or theta_end is not None):
        if grad_momentum is None:
            grad_momentum = momentum.new_zeros(momentum.shape)
        if end_momentum is not None:
            grad_momentum[..., -1, 1:].add_(end_momentum * eta)
        if theta_end is not None:
            grad_momentum[..., -1, 0].add_(theta_end)
    return grad_momentum
