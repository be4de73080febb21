"""A deep-memory chunk's read-out as one autograd node with a written backward.

Inside a chunk (``ops/deep_memory.py``) layer l's pre-activation at query row t is

    pre_l = s (W_l h) - (coef * (h a_l^T)) e_l + c (S_l h) - [l = 1] (eta_decay * (h a_1^T)) w

with h = h_{l-1} (h_0 = q), s = scale and c = carry per row, coef and eta_decay the chunk's
C x C coefficient matrices, a_l, e_l the chunk's layer inputs and output errors, S_l the
momentum and w the delta rule's pseudo-values; h_l = act(pre_l) and the output is q + pre_L.

Why one node: autograd of these lines records about 80 nodes per chunk for a 2-layer memory
(each ``@`` on ``[B, H, C, D]`` tensors is two expands, two reshapes, a ``bmm`` and a view;
each broadcast product a multiplication whose backward reduces), and HOPE's step runs the chunk
once per 16 tokens per block. Written out, with G = dL/dpre_l, the backward is per layer

    dW_l = (s G)^T h,   dS_l = (c G)^T h,   ds = rowsum((G W_l) * h),   dc = rowsum((G S_l) * h),
    dcoef = -(G e_l^T) * (h a_l^T),   de_l = -(coef * (h a_l^T))^T G,
    dh = s (G W_l) + c (G S_l) + dScores a_l,   da_l = dScores^T h,
    dScores = -coef * (G e_l^T) [- eta_decay * (G w^T)],   G_{l-1} = dh * act'(pre_{l-1}),

the delta-rule term's ``deta_decay``, ``dw`` alike. ``tests/test_ops_chunk_read.py`` ties it to
autograd of the plain expression in float64. First order only, like the other written nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nestlearn.ops._deep_memory_common import (
    ACTIVATIONS,
    accumulate,
    add_product,
    apply_weight,
    sum_to_shape,
)
from nestlearn.ops._first_order import check_first_order


def row_scaled_product(scale: torch.Tensor, x: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """Rows ``scale[t] * (W x_t)``, scaling whichever side is narrower: the product is the same,
    and the backward then keeps the narrow scaled tensor instead of the wide one."""
    if weight.shape[-1] <= weight.shape[-2]:
        return apply_weight(scale[..., None] * x, weight)
    return scale[..., None] * apply_weight(x, weight)


def chunk_read(activation: str, queries: torch.Tensor, scale: torch.Tensor,
               coef: torch.Tensor, carry: torch.Tensor | None,
               eta_decay: torch.Tensor | None, pseudo: torch.Tensor | None,
               weights: list[torch.Tensor], momentum: list[torch.Tensor] | None,
               inputs: list[torch.Tensor], errors: list[torch.Tensor]) -> torch.Tensor:
    """``M_t(q_t)`` for a chunk's query rows (module docstring): ``queries`` ``[..., C, D]``,
    ``scale``, ``carry`` ``[..., C]``, ``coef``, ``eta_decay`` ``[..., C, C]``, per layer the
    weight and momentum ``[..., out, in]``, inputs ``[..., C, in]`` and errors
    ``[..., C, out]``; ``carry``/``momentum`` both given or both None, likewise ``eta_decay``
    and ``pseudo`` (``[..., C, hidden]``, the first layer's delta-rule term)."""
    layers = len(weights)
    moments = list(momentum) if momentum is not None else [None] * layers
    return _ChunkRead.apply(activation, layers, queries, scale, coef, carry, eta_decay, pseudo,
                            *weights, *moments, *inputs, *errors)


def chunk_read_reference(activation: str, queries: torch.Tensor, scale: torch.Tensor,
                         coef: torch.Tensor, carry: torch.Tensor | None,
                         eta_decay: torch.Tensor | None, pseudo: torch.Tensor | None,
                         weights: list[torch.Tensor], momentum: list[torch.Tensor] | None,
                         inputs: list[torch.Tensor], errors: list[torch.Tensor]
                         ) -> torch.Tensor:
    """:func:`chunk_read` as plain differentiable ops (the module docstring's lines as
    written; autograd's backward): the reference the node is tested against."""
    act = ACTIVATIONS[activation][0]
    hidden = queries
    for index, weight in enumerate(weights):
        scores = hidden @ inputs[index].transpose(-1, -2)  # (a_i . x_t), [..., C, C]
        pre = scale[..., None] * (hidden @ weight.transpose(-1, -2))
        pre = pre - (coef * scores) @ errors[index]
        if carry is not None and momentum is not None:
            pre = pre + carry[..., None] * (hidden @ momentum[index].transpose(-1, -2))
        if pseudo is not None and eta_decay is not None and index == 0:
            pre = pre - (eta_decay * scores) @ pseudo
        hidden = act(pre) if index < len(weights) - 1 else pre
    return queries + hidden


@dataclass
class _Saved:
    """What the node's forward keeps for its backward, per layer: the input rows h, the
    pre-activations (all but the last), the scores (a_i . h_t) and the weighted scores
    -coef * scores; for the delta rule's term the first layer's -eta_decay * scores."""

    hiddens: list[torch.Tensor] = field(default_factory=list)
    pres: list[torch.Tensor] = field(default_factory=list)
    scores: list[torch.Tensor] = field(default_factory=list)
    weighted: list[torch.Tensor] = field(default_factory=list)
    pseudo_weighted: torch.Tensor | None = None


def _read_forward(activation: str, queries: torch.Tensor, scale: torch.Tensor,
                  neg_coef: torch.Tensor, carry: torch.Tensor | None,
                  neg_decay: torch.Tensor | None, pseudo: torch.Tensor | None,
                  weights: list[torch.Tensor], momentum: list[torch.Tensor] | None,
                  inputs: list[torch.Tensor], errors: list[torch.Tensor]
                  ) -> tuple[torch.Tensor, _Saved]:
    """The node's forward (unrecorded) from the negated coefficient matrices, so each score
    term is one fused multiply-add (``add_product``) and the momentum term another
    (``addcmul``): three kernels a layer fewer than the reference's lines."""
    act = ACTIVATIONS[activation][0]
    hidden = queries
    saved = _Saved()
    for index, weight in enumerate(weights):
        scores = hidden @ inputs[index].transpose(-1, -2)
        weighted = neg_coef * scores
        pre = add_product(row_scaled_product(scale, hidden, weight), weighted, errors[index])
        if carry is not None and momentum is not None:
            pre = torch.addcmul(pre, carry[..., None], apply_weight(hidden, momentum[index]))
        if pseudo is not None and neg_decay is not None and index == 0:
            saved.pseudo_weighted = neg_decay * scores
            pre = add_product(pre, saved.pseudo_weighted, pseudo)
        saved.hiddens.append(hidden)
        saved.scores.append(scores)
        saved.weighted.append(weighted)
        if index < len(weights) - 1:
            saved.pres.append(pre)
            hidden = act(pre)
        else:
            hidden = pre
    return queries + hidden, saved


def through_activation(activation: str, grad: torch.Tensor, pre: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """``grad * act'(pre)`` by the activation's own backward kernel (one op where the slope
    formula takes several); ``out`` = act(pre)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    return torch.ops.aten.tanh_backward(grad, out)


class _ChunkRead(torch.autograd.Function):
    """``chunk_read`` with the backward of the module docstring. Reverse mode, first order."""

    @staticmethod
    def forward(ctx: Any, activation: str, layers: int, queries: torch.Tensor,
                scale: torch.Tensor, coef: torch.Tensor, carry: torch.Tensor | None,
                eta_decay: torch.Tensor | None, pseudo: torch.Tensor | None,
                *per_layer: torch.Tensor | None) -> torch.Tensor:
        weights = list(per_layer[:layers])
        moments = per_layer[layers:2 * layers]
        momentum = None if moments[0] is None else list(moments)
        inputs = list(per_layer[2 * layers:3 * layers])
        errors = list(per_layer[3 * layers:])
        neg_coef = -coef
        neg_decay = -eta_decay if pseudo is not None and eta_decay is not None else None
        out, saved = _read_forward(activation, queries, scale, neg_coef, carry, neg_decay,
                                   pseudo, weights, momentum, inputs, errors)
        ctx.activation, ctx.layers = activation, layers
        ctx.has_momentum = momentum is not None
        ctx.save_for_backward(scale, neg_coef, carry, neg_decay, pseudo,
                              saved.pseudo_weighted, *weights, *(momentum or []), *inputs,
                              *errors, *saved.hiddens, *saved.pres, *saved.scores,
                              *saved.weighted)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        check_first_order("the deep memory's chunk read")
        layers = ctx.layers
        saved = list(ctx.saved_tensors)
        scale, neg_coef, carry, neg_decay, pseudo, pseudo_weighted = saved[:6]
        rest = saved[6:]
        weights, rest = rest[:layers], rest[layers:]
        momentum = None
        if ctx.has_momentum:
            momentum, rest = rest[:layers], rest[layers:]
        inputs, rest = rest[:layers], rest[layers:]
        errors, rest = rest[:layers], rest[layers:]
        hiddens, rest = rest[:layers], rest[layers:]
        pres, rest = rest[:layers - 1], rest[layers - 1:]
        scores, weighted = rest[:layers], rest[layers:]
        need = ctx.needs_input_grad  # (activation, layers, q, scale, coef, carry, eta_decay,
        #                              pseudo, weights..., momentum..., inputs..., errors...)
        grad_weights: list[torch.Tensor | None] = [None] * layers
        grad_moments: list[torch.Tensor | None] = [None] * layers
        grad_inputs: list[torch.Tensor | None] = [None] * layers
        grad_errors: list[torch.Tensor | None] = [None] * layers
        grad_scale = grad_carry = grad_decay = grad_pseudo = None
        # the read subtracts its score terms: the coefficients' gradients are summed with
        # the opposite sign and negated once at the end
        coef_sum = None
        grad = grad_out.contiguous()  # dL/dpre of the last layer
        grad_hidden = None
        for index in range(layers - 1, -1, -1):
            hidden, weight, score = hiddens[index], weights[index], scores[index]
            through_weight = grad @ weight  # G W_l, [..., C, in]
            grad_hidden = scale[..., None] * through_weight
            if need[3]:
                grad_scale = accumulate(grad_scale, torch.linalg.vecdot(through_weight, hidden))
            if need[8 + index]:
                grad_weights[index] = sum_to_shape(
                    (scale[..., None] * grad).transpose(-1, -2) @ hidden, weight)
            if momentum is not None and carry is not None:
                moment = momentum[index]
                through_moment = grad @ moment
                grad_hidden = torch.addcmul(grad_hidden, carry[..., None], through_moment)
                if need[5]:
                    grad_carry = accumulate(grad_carry,
                                            torch.linalg.vecdot(through_moment, hidden))
                if need[8 + layers + index]:
                    grad_moments[index] = sum_to_shape(
                        (carry[..., None] * grad).transpose(-1, -2) @ hidden, moment)
            by_error = grad @ errors[index].transpose(-1, -2)  # G e_l^T, [..., C, C]
            grad_scores = neg_coef * by_error
            if need[4]:
                coef_sum = (by_error * score if coef_sum is None
                            else torch.addcmul(coef_sum, by_error, score))
            if need[8 + 3 * layers + index]:
                grad_errors[index] = weighted[index].transpose(-1, -2) @ grad
            if index == 0 and pseudo is not None and neg_decay is not None:
                by_pseudo = grad @ pseudo.transpose(-1, -2)
                grad_scores = torch.addcmul(grad_scores, neg_decay, by_pseudo)
                if need[6]:
                    grad_decay = torch.mul(by_pseudo, score).neg_()
                if need[7]:
                    grad_pseudo = pseudo_weighted.transpose(-1, -2) @ grad
            grad_hidden = add_product(grad_hidden, grad_scores, inputs[index])
            if need[8 + 2 * layers + index]:
                grad_inputs[index] = grad_scores.transpose(-1, -2) @ hidden
            if index > 0:
                grad = through_activation(ctx.activation, grad_hidden, pres[index - 1],
                                           hidden)
        grad_coef = coef_sum.neg_() if coef_sum is not None else None
        grad_queries = grad_out + grad_hidden if need[2] else None
        return (None, None, grad_queries, grad_scale, grad_coef, grad_carry, grad_decay,
                grad_pseudo, *grad_weights, *grad_moments, *grad_inputs, *grad_errors)
