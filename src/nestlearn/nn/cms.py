"""Continuum Memory System (CMS, docs/paper.md section 3): MLP levels that learn in context.

Level l (l = 1..k, chunk sizes C^(1) < ... < C^(k)) is a pre-norm residual MLP,
``h -> h + mlp_l(norm_l(h))``, whose MLP weights are fast weights kept in the layer state, one
copy per batch element. They start from meta-learned parameters and change only when the
absolute token position reaches a multiple of C^(l), by the error accumulated over the chunk:

    theta^(l) <- theta^(l) - eta^(l) * sum_{t in chunk} f(theta^(l); x_t)

(all gradients of a chunk taken at the chunk's starting weights, so the chunk is processed in
parallel). Variants (see CMS.md for the exact reading):
- ``sequential``: ``y = level_k(... level_1(x))``; every level's initial weights meta-learned;
- ``nested``: the same chain, but only the slowest level has meta-learned weights: level l
  starts each of its contexts (one chunk of level l + 1) from level l + 1's current weights;
- ``independent``: ``y = x + sum_l a_l mlp_l(norm_l(x))`` with learned mixing weights a_l.

Teach signals f: ``"local"`` (default) regresses each level's MLP output onto a learned linear
target of its own normalized input, computed inside ``forward`` (exact, differentiable, works at
inference); ``"lm"`` leaves ``forward`` frozen and takes the gradient of the stream's next-token
loss from ``nestlearn.nn.teach_signal.stream_with_teach_signal``, which hands ``forward`` its
``teach_hook`` (without one, an LM-driven layer just runs its current weights).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nestlearn.errors import (
    check_bool,
    check_choice,
    check_int,
    check_nonnegative,
    check_positive,
    invalid,
)
from nestlearn.nn.cms_levels import (
    MLP_KINDS,
    init_level_weights,
    level_derivatives,
    level_forward,
    level_grad_factors,
    outer_sum,
    weight_names,
    weight_shapes,
)
from nestlearn.nn.cms_step_gate import curvature_parts, step_gate_factor
from nestlearn.nn.transformer import RMSNorm
from nestlearn.ops._compile import compiled_step
from nestlearn.state import TreeState, state_dataclass, static_field

VARIANTS = ("sequential", "nested", "independent")
TEACH_SIGNALS = ("local", "lm")

# The LM teach-signal driver's hook (``nestlearn.nn.teach_signal``): a CMS layer with
# teach_signal="lm" passes its incoming state through it, to use its weights as w + leaf.
TeachHook = Callable[["ContinuumMemoryState"], "ContinuumMemoryState"]


def _through_teach_hook(state: ContinuumMemoryState,
                        teach_hook: TeachHook | None) -> ContinuumMemoryState:
    if teach_hook is None or state.config.teach_signal != "lm":
        return state
    return teach_hook(state)


def _per_level(name: str, value: object, levels: int) -> tuple:
    """A scalar broadcast to every level, or a sequence with one entry per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise invalid(name, repr(value), f"one value or {levels} values (one per level)")
        return tuple(value)
    return (value,) * levels


@dataclass(frozen=True)
class CMSConfig:
    """Configuration of a ``ContinuumMemory`` layer (validated at construction).

    ``chunk_sizes``: strictly increasing C^(1) < ... < C^(k), one per level.
    ``hidden``: MLP hidden width, one int for all levels or one per level (None: 4 * dim; in
    a model, the model's ``mlp_hidden``); ``level_hidden`` gives one width per level.
    ``mlp``: ``"swiglu"`` or ``"gelu"``. ``variant``: ``"sequential"``, ``"nested"`` or
    ``"independent"``. ``teach_signal``: ``"local"`` or ``"lm"``.
    ``inner_lr``: eta^(l) >= 0, one float for all levels or one per level; it multiplies a
    *sum* of per-token gradients over the chunk, so scale it down with the chunk size.
    ``frozen``: no in-context change at all (a plain MLP chain), whatever ``inner_lr`` says.
    ``chunk_step``: with the local teach signal, token t's step is
    ``min(inner_lr, chunk_step / (C^(l) kappa_t))``, kappa_t a bound on the curvature of its
    loss (``token_curvature``), so a whole chunk's step has curvature at most ``chunk_step``
    (< 2 cannot overshoot, as for the memories: CMS.md, "Step ceiling"). None: no ceiling.
    ``norm_eps``: epsilon of each level's RMSNorm. ``init_std`` / ``out_init_std``: std of the
    initial input-side / output-side weights (``out_init_std`` defaults to ``init_std``).
    """

    dim: int
    chunk_sizes: tuple[int, ...] = (16, 64)
    hidden: int | tuple[int, ...] | None = None
    mlp: str = "swiglu"
    variant: str = "sequential"
    teach_signal: str = "local"
    inner_lr: float | tuple[float, ...] = 1e-3
    frozen: bool = False
    chunk_step: float | None = 1.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    out_init_std: float | None = None

    def __post_init__(self) -> None:
        check_int("dim", self.dim)
        sizes = self.chunk_sizes
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            sizes = (sizes,)
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise invalid("chunk_sizes", repr(self.chunk_sizes), "a non-empty sequence of ints")
        for size in sizes:
            check_int("chunk_sizes", size)
        if any(a >= b for a, b in itertools.pairwise(sizes)):
            raise invalid("chunk_sizes", repr(self.chunk_sizes),
                          "strictly increasing chunk sizes C^(1) < ... < C^(k)")
        object.__setattr__(self, "chunk_sizes", tuple(sizes))
        levels = len(sizes)
        if isinstance(self.hidden, list):
            object.__setattr__(self, "hidden", tuple(self.hidden))
        hidden = self.level_hidden
        for width in hidden:
            check_int("hidden", width)
        check_choice("mlp", self.mlp, MLP_KINDS)
        check_choice("variant", self.variant, VARIANTS)
        if self.variant == "nested" and len(set(hidden)) != 1:
            raise invalid("hidden", repr(hidden),
                          "one width for all levels with variant='nested' (levels share weights)")
        check_choice("teach_signal", self.teach_signal, TEACH_SIGNALS)
        rates = _per_level("inner_lr", self.inner_lr, levels)
        for rate in rates:
            check_nonnegative("inner_lr", rate)
        # Canonical form: one value when every level shares it (so ``--set
        # cms.chunk_sizes=...`` can change the number of levels), else one per level.
        object.__setattr__(self, "inner_lr",
                           rates[0] if len(set(rates)) == 1 else tuple(rates))
        check_bool("frozen", self.frozen)
        if self.chunk_step is not None:
            check_positive("chunk_step", self.chunk_step)
        for name in ("norm_eps", "init_std"):
            check_positive(name, getattr(self, name))
        if self.out_init_std is not None:
            check_nonnegative("out_init_std", self.out_init_std)

    @property
    def level_hidden(self) -> tuple[int, ...]:
        """The hidden width of every level (``hidden`` resolved; None means ``4 * dim``)."""
        return _per_level("hidden", 4 * self.dim if self.hidden is None else self.hidden,
                          len(self.chunk_sizes))

    @property
    def level_inner_lr(self) -> tuple[float, ...]:
        """The inner learning rate eta^(l) of every level (``inner_lr`` resolved)."""
        return _per_level("inner_lr", self.inner_lr, len(self.chunk_sizes))

    @property
    def num_levels(self) -> int:
        return len(self.chunk_sizes)

    @property
    def learns_in_context(self) -> bool:
        """True when some level's weights can change inside a sequence."""
        return not self.frozen and any(rate > 0 for rate in self.level_inner_lr)

    def level_learns(self, level: int) -> bool:
        return not self.frozen and self.level_inner_lr[level] > 0


@state_dataclass
class CMSLevelState(TreeState):
    """Fast weights of one level and what its current (unfinished) chunk has seen.

    ``weights``: ``[out, in]`` (still the shared meta-learned parameters) or ``[B, out, in]``.
    ``accumulator``: ``[B, out, in]`` per weight, or None when nothing is accumulated.
    ``pending``: ``(inputs, targets)``, each ``[B, P, D]``: the level's normalized inputs and
    local targets of the last P tokens of its unfinished chunk, whose gradients are not taken
    yet (the chunk's earlier tokens, if any, are in the accumulator), or None. A chunk's
    gradients are all taken at its starting weights, so they wait for the chunk's end and are
    taken there in one call (a token decoded alone pays only the MLP). The chunk's gradient
    sum so far is ``unfinished_gradient``.
    """

    weights: tuple[torch.Tensor, ...]
    accumulator: tuple[torch.Tensor, ...] | None = None
    pending: tuple[torch.Tensor, torch.Tensor] | None = None


@state_dataclass
class ContinuumMemoryState(TreeState):
    """State of a ``ContinuumMemory`` layer: its config, the absolute position of the next
    token, the batch size and one ``CMSLevelState`` per level (fastest first)."""

    config: CMSConfig = static_field()
    position: int = static_field()
    batch_size: int = static_field()
    levels: tuple[CMSLevelState, ...] = ()


Factors = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def token_curvature(kind: str, weights: tuple[torch.Tensor, ...], n: torch.Tensor,
                    activations: tuple[torch.Tensor, ...],
                    derivatives: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """``[B, P]``: per token, a bound on the largest eigenvalue of the Gauss-Newton matrix
    J^T J of ``1/2 ||mlp(n_t) - target||^2`` in all of the level's weights (CMS.md, "Step
    ceiling"): ||J||^2 <= sum over weights of ||J_w||^2, with ||J_down||^2 = ||hidden||^2 and,
    for an input-side weight, ||J_w||^2 <= ||n||^2 sum_i ||w_down[:, i]||^2 d_i^2 (d_i the
    hidden unit's derivative with respect to that weight's output i). ``derivatives``:
    ``level_derivatives(kind, activations)`` if already made (the gradient reads them too).

    Differentiable by autograd (the plain form the tests tie ``step_gate``'s node to: that
    node computes the same kappa with a written backward, ``nn.cms_step_gate``)."""
    if derivatives is None:
        derivatives = level_derivatives(kind, activations)
    return curvature_parts(activations[-1], n, weights[-1], derivatives)[-1]


def step_gate(config: CMSConfig, index: int, weights: tuple[torch.Tensor, ...],
              n: torch.Tensor, activations: tuple[torch.Tensor, ...],
              derivatives: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor | None:
    """``[B, P, 1]``: the factor in (0, 1] on each token's gradient that caps its step at
    ``chunk_step / (C kappa_t)`` (None without a ceiling)."""
    if config.chunk_step is None:
        return None
    if derivatives is None:
        derivatives = level_derivatives(config.mlp, activations)
    budget = config.chunk_step / (config.level_inner_lr[index] * config.chunk_sizes[index])
    # min(1, budget / kappa) (budget > 0: a level that learns has inner_lr > 0): the plain
    # form is budget / token_curvature(...).clamp_min(budget); one node with a written backward
    return step_gate_factor(budget, activations[-1], n, weights[-1], derivatives)


def _changes_at(config: CMSConfig, index: int, position: int) -> bool:
    """Whether ``apply_boundaries`` at ``position`` updates or restarts level ``index``."""
    if position % config.chunk_sizes[index] == 0:
        return True
    nested = config.variant == "nested" and index + 1 < config.num_levels
    return nested and position % config.chunk_sizes[index + 1] == 0


def _flush(levels: tuple[CMSLevelState, ...], pending: list[list[Factors]],
           indices: Iterable[int]) -> tuple[CMSLevelState, ...]:
    """Add the pending gradient factors of the given levels to their accumulators."""
    result = list(levels)
    for index in indices:
        if not pending[index]:
            continue
        pieces = pending[index]
        factors = [tuple(torch.cat([p[w][side] for p in pieces], dim=1) if len(pieces) > 1
                         else pieces[0][w][side] for side in (0, 1))
                   for w in range(len(pieces[0]))]
        level = result[index]
        if level.accumulator is None:
            total = tuple(outer_sum(left, right) for left, right in factors)
        else:
            # acc + sum_t left_t right_t^T in one kernel per weight (decoding flushes every
            # token, so this halves the accumulation's kernels).
            total = tuple(torch.baddbmm(acc, left.transpose(1, 2), right)
                          for acc, (left, right) in zip(level.accumulator, factors, strict=True))
        result[index] = CMSLevelState(level.weights, total, level.pending)
        pending[index] = []
    return tuple(result)


def _flush_one(level: CMSLevelState, pieces: list[Factors]) -> CMSLevelState:
    """``_flush`` of one level: its pending pieces' gradient factors added to its
    accumulator."""
    return _flush((level,), [pieces], (0,))[0]


def _hold(level: CMSLevelState, n: torch.Tensor, target: torch.Tensor,
          copy: bool) -> CMSLevelState:
    """``level`` with a piece's inputs and targets added to its pending tokens (in the
    state's dtype: under autocast the targets come out in the lower precision). ``copy``: the
    piece is a view of a longer segment's tensors, which a held view would keep alive."""
    dtype = level.weights[0].dtype
    piece = tuple(part.to(dtype) for part in (n, target))
    if level.pending is None:
        held = tuple(part.clone() for part in piece) if copy else piece
    else:
        held = tuple(torch.cat((before, new), dim=1)
                     for before, new in zip(level.pending, piece, strict=True))
    return CMSLevelState(level.weights, level.accumulator, held)


def _release(level: CMSLevelState, n: torch.Tensor, target: torch.Tensor
             ) -> tuple[CMSLevelState, torch.Tensor, torch.Tensor, int]:
    """For a piece that ends its chunk: ``level`` without its pending tokens, the piece's
    inputs and targets with those tokens put first, and how many there were."""
    if level.pending is None:
        return level, n, target, 0
    inputs, targets = level.pending
    return (CMSLevelState(level.weights, level.accumulator),
            torch.cat((inputs, n), dim=1), torch.cat((targets, target), dim=1),
            inputs.shape[1])


def unfinished_gradient(config: CMSConfig, index: int, level: CMSLevelState
                        ) -> tuple[torch.Tensor, ...] | None:
    """The gradient sum of level ``index``'s unfinished chunk so far, ``[B, out, in]`` per
    weight: its accumulator plus the gradients of its pending tokens (None: neither)."""
    if level.pending is None:
        return level.accumulator
    _, factors = _level_piece(config, index, level.weights, *level.pending, True)
    return _flush_one(CMSLevelState(level.weights, level.accumulator), [factors]).accumulator


def settled(state: ContinuumMemoryState) -> ContinuumMemoryState:
    """``state`` with every level's pending tokens' gradients added to its accumulator: the
    same state (the same outputs and updates ahead) in the form the token-by-token reference
    ``ContinuumMemory.forward_naive`` keeps; ``state`` itself when no level holds tokens."""
    if all(level.pending is None for level in state.levels):
        return state
    levels = tuple(CMSLevelState(level.weights,
                                 unfinished_gradient(state.config, index, level))
                   for index, level in enumerate(state.levels))
    return dataclasses.replace(state, levels=levels)


def _level_step(config: CMSConfig, index: int, level: CMSLevelState) -> CMSLevelState:
    """What ``apply_boundaries`` does to level ``index`` (not nested) at one of its chunk
    ends: the step ``theta <- theta - eta * accumulator``, the accumulator cleared."""
    if config.frozen or not config.level_learns(index) or level.accumulator is None:
        return level
    rate = config.level_inner_lr[index]
    return CMSLevelState(tuple(torch.add(w, acc, alpha=-rate)
                               for w, acc in zip(level.weights, level.accumulator, strict=True)),
                         None)


def _accumulate(level: CMSLevelState, grads: tuple[torch.Tensor, ...]) -> CMSLevelState:
    total = grads if level.accumulator is None else tuple(
        acc + grad for acc, grad in zip(level.accumulator, grads, strict=True))
    return CMSLevelState(level.weights, total)


def apply_boundaries(config: CMSConfig, levels: tuple[CMSLevelState, ...],
                     position: int) -> tuple[CMSLevelState, ...]:
    """Apply the updates due once ``position`` tokens have been seen (docs/paper.md section 3).

    A level whose chunk size divides ``position`` takes its step
    ``theta <- theta - eta * accumulator`` and clears the accumulator. With the nested variant,
    a level then restarts from the (new) weights of the next slower level whenever that
    level's chunk ends, i.e. when its own context ends.
    """
    if config.frozen:
        return levels
    result = list(levels)
    for index, level in enumerate(result):
        size = config.chunk_sizes[index]
        if position % size or not config.level_learns(index) or level.accumulator is None:
            continue
        rate = config.level_inner_lr[index]
        weights = tuple(torch.add(w, acc, alpha=-rate)
                        for w, acc in zip(level.weights, level.accumulator, strict=True))
        result[index] = CMSLevelState(weights, None)
    if config.variant == "nested":
        for index in range(config.num_levels - 2, -1, -1):
            if position % config.chunk_sizes[index + 1] == 0:
                result[index] = CMSLevelState(result[index + 1].weights, None)
    return tuple(result)


def commit_teach_signal(state: ContinuumMemoryState,
                        grads: tuple[tuple[torch.Tensor, ...] | None, ...]
                        ) -> ContinuumMemoryState:
    """Add externally computed per-batch gradients (the LM teach signal) to each level's
    accumulator, then apply the updates due at ``state.position``. ``grads[l]`` is None for a
    level that does not learn."""
    levels = tuple(level if grad is None else _accumulate(level, grad)
                   for level, grad in zip(state.levels, grads, strict=True))
    levels = apply_boundaries(state.config, levels, state.position)
    return ContinuumMemoryState(state.config, state.position, state.batch_size, levels)


def boundary_pieces(position: int, length: int,
                    chunk_sizes: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """Split absolute positions ``[position, position + length)`` at every multiple of any
    chunk size: inside a piece no level's weights change."""
    start, end = position, position + length
    while start < end:
        stop = min(min((start // size + 1) * size for size in chunk_sizes), end)
        yield start, stop
        start = stop


def _level_piece(config: CMSConfig, index: int, weights: tuple[torch.Tensor, ...],
                 n: torch.Tensor, target: torch.Tensor, learns: bool
                 ) -> tuple[torch.Tensor, Factors | None]:
    """One piece of level ``index`` in ``ContinuumMemorySystem._run_levels``: its output
    ``mlp(n)`` and, when the level learns, the gradient factors of the local objective
    ``1/2 ||mlp(n) - target||^2`` under the step ceiling (``_level_error``, ``step_gate``)."""
    out, activations = level_forward(config.mlp, weights, n)
    if not learns:
        return out, None
    error = out - target
    # made once: the step ceiling and the gradient both read them
    derivatives = level_derivatives(config.mlp, activations)
    gate = step_gate(config, index, weights, n, activations, derivatives)
    if gate is not None:
        error = error * gate
    return out, level_grad_factors(config.mlp, weights, n, activations, error, derivatives)


# A level's piece as the CMS runs it: compiled whole under nestlearn.ops.set_compile(True).
_level_piece_step = compiled_step(_level_piece)


class LevelParameters(nn.Module):
    """Meta-learned initial weights of one level, named as in ``cms_levels.weight_names``."""

    def __init__(self, kind: str, dim: int, hidden: int, init_std: float,
                 out_init_std: float) -> None:
        super().__init__()
        self.kind = kind
        self.names = weight_names(kind)
        initial = init_level_weights(kind, dim, hidden, init_std, out_init_std)
        for name, tensor in zip(self.names, initial, strict=True):
            self.register_parameter(name, nn.Parameter(tensor))

    def weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.names)


class ContinuumMemory(nn.Module):
    """The CMS layer: ``forward(x [B, T, D], state=None) -> (y [B, T, D], state)``.

    One pass over a sequence equals the same sequence fed in segments with the returned state,
    whatever the split points. ``forward_naive`` is the token-by-token reference.
    """

    def __init__(self, config: CMSConfig) -> None:
        super().__init__()
        if not isinstance(config, CMSConfig):
            raise invalid("config", type(config).__name__, "a CMSConfig")
        self.config = config
        dim = config.dim
        out_std = config.init_std if config.out_init_std is None else config.out_init_std
        owners = 1 if config.variant == "nested" else config.num_levels
        # Nested: only the slowest level's initial weights are meta-learned by backprop; the
        # faster levels start from it (index 0 here serves every level).
        self.initial = nn.ModuleList(
            LevelParameters(config.mlp, dim, config.level_hidden[-1 if owners == 1 else i],
                            config.init_std, out_std) for i in range(owners))
        self.norms = nn.ModuleList(RMSNorm(dim, config.norm_eps)
                                   for _ in range(config.num_levels))
        # Local teach signal: level l regresses mlp_l(n) onto target_l n (learned, starts at 0).
        self.local_targets = nn.ParameterDict()
        if config.teach_signal == "local":
            for index in range(config.num_levels):
                if config.level_learns(index):
                    self.local_targets[str(index)] = nn.Parameter(torch.zeros(dim, dim))
        if config.variant == "independent":
            self.mix = nn.Parameter(torch.full((config.num_levels,), 1.0 / config.num_levels))

    def initial_weights(self, level: int) -> tuple[torch.Tensor, ...]:
        """The meta-learned initial weights of ``level`` (0-based, fastest first)."""
        owner = 0 if self.config.variant == "nested" else level
        return self.initial[owner].weights()

    def load_level_from_swiglu(self, level: int, w_gate: torch.Tensor, w_up: torch.Tensor,
                               w_down: torch.Tensor,
                               norm_weight: torch.Tensor | None = None) -> None:
        """Copy a trained SwiGLU MLP (and its pre-norm gain) into a level's initial weights.

        Ad-hoc level stacking (docs/paper.md section 3): with ``frozen=True`` or zero inner
        learning rates the level then computes exactly ``h + swiglu(norm(h))``.
        """
        if self.config.mlp != "swiglu":
            raise invalid("config.mlp", repr(self.config.mlp), "'swiglu' to load a SwiGLU MLP")
        if not 0 <= level < len(self.initial):
            raise invalid("level", level, f"an int in [0, {len(self.initial) - 1}]")
        target = self.initial[level]
        with torch.no_grad():
            for name, source in zip(target.names, (w_gate, w_up, w_down), strict=True):
                param = getattr(target, name)
                if tuple(source.shape) != tuple(param.shape):
                    raise invalid(name + ".shape", tuple(source.shape), str(tuple(param.shape)))
                param.copy_(source)
            if norm_weight is not None:
                norm = self.norms[level].weight
                if tuple(norm_weight.shape) != tuple(norm.shape):
                    raise invalid("norm_weight.shape", tuple(norm_weight.shape),
                                  str(tuple(norm.shape)))
                norm.copy_(norm_weight)

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> ContinuumMemoryState:
        """Position 0, every level at its meta-learned weights (gradients reach them)."""
        check_int("batch", batch)
        levels = []
        for index in range(self.config.num_levels):
            weights = tuple(w.to(device=device or w.device, dtype=dtype or w.dtype)
                            for w in self.initial_weights(index))
            levels.append(CMSLevelState(weights, None))
        return ContinuumMemoryState(self.config, 0, batch, tuple(levels))

    def _check_input(self, x: object) -> torch.Tensor:
        dim = self.config.dim
        if not isinstance(x, torch.Tensor):
            raise invalid("x", type(x).__name__, f"a torch.Tensor of shape [B, T, {dim}]")
        if x.dim() != 3 or x.shape[-1] != dim or x.shape[0] == 0:
            raise invalid("x.shape", tuple(x.shape), f"[B, T, {dim}] with B >= 1")
        if x.shape[1] == 0:
            raise invalid("x.shape", tuple(x.shape), "a sequence length T >= 1")
        param = self.initial[0].weights()[0]
        if x.dtype != param.dtype:
            raise invalid("x.dtype", x.dtype, f"the layer's dtype ({param.dtype})")
        return x

    def _check_state(self, state: object, x: torch.Tensor) -> ContinuumMemoryState:
        if not isinstance(state, ContinuumMemoryState):
            raise invalid("state", type(state).__name__, "a ContinuumMemoryState or None")
        if state.config != self.config:
            raise invalid("state.config", state.config,
                          f"a state made by a ContinuumMemory with this config ({self.config})")
        if state.batch_size != x.shape[0]:
            raise invalid("state.batch_size", state.batch_size, f"the batch of x ({x.shape[0]})")
        shapes = [weight_shapes(self.config.mlp, self.config.dim, h)
                  for h in self.config.level_hidden]
        if len(state.levels) != self.config.num_levels:
            raise invalid("state.levels", len(state.levels), f"{self.config.num_levels} levels")
        for index, level in enumerate(state.levels):
            for weight, shape in zip(level.weights, shapes[index], strict=True):
                if tuple(weight.shape[-2:]) != shape or weight.dim() not in (2, 3) or (
                        weight.dim() == 3 and weight.shape[0] != x.shape[0]):
                    raise invalid(f"state.levels[{index}].weights", tuple(weight.shape),
                                  f"{shape} or [B, *{shape}]")
                if weight.dtype != x.dtype or weight.device != x.device:
                    raise invalid(f"state.levels[{index}].weights",
                                  f"{weight.dtype} on {weight.device}",
                                  f"the dtype and device of x ({x.dtype} on {x.device})")
            if level.pending is not None:
                self._check_pending(index, level.pending, x)
        return state

    def _check_pending(self, index: int, pending: object, x: torch.Tensor) -> None:
        """A level's pending tokens: ``(inputs, targets)`` ``[B, P, D]``, P >= 1. Any P: a
        state that holds fewer than the tokens since the chunk's start has the others in its
        accumulator (a settled state, one written back by ``nestlearn.continual``), and one
        rolled back to an earlier position of the stream holds what it held then."""
        name = f"state.levels[{index}].pending"
        if not (isinstance(pending, tuple) and len(pending) == 2
                and all(isinstance(p, torch.Tensor) for p in pending)):
            raise invalid(name, type(pending).__name__, "a tuple (inputs, targets) of tensors")
        if self.config.variant == "nested":
            # its pieces take their gradients as they come (a level restarts mid-chunk)
            raise invalid(name, "held tokens", "None (the nested variant holds none)")
        held = pending[0].shape[1] if pending[0].dim() == 3 else 0
        shape = (x.shape[0], held, self.config.dim)
        for part in pending:
            if tuple(part.shape) != shape or held < 1 or not self.config.level_learns(index):
                raise invalid(name, tuple(part.shape),
                              f"two tensors [{x.shape[0]}, P, {self.config.dim}] (batch, held "
                              "tokens P >= 1, dim) on a level that learns in context")
            if part.dtype != x.dtype or part.device != x.device:
                raise invalid(name, f"{part.dtype} on {part.device}",
                              f"the dtype and device of x ({x.dtype} on {x.device})")

    def _level_error(self, index: int, n: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Local objective's error ``mlp(n) - target n`` (target: a learned linear map of n)."""
        return out - n @ self.local_targets[str(index)].transpose(0, 1)

    def _run_piece(self, x: torch.Tensor, levels: tuple[CMSLevelState, ...], local: bool
                   ) -> tuple[torch.Tensor, list[Factors | None]]:
        """Output of a piece (no boundary inside) and, with the local signal, the gradient
        factors of each learning level over the piece (taken at the piece's weights)."""
        config = self.config
        factors: list[Factors | None] = [None] * config.num_levels
        h = x
        mixed = None
        for index, level in enumerate(levels):
            n = self.norms[index](x if config.variant == "independent" else h)
            out, activations = level_forward(config.mlp, level.weights, n)
            if local and config.level_learns(index):
                error = self._level_error(index, n, out)
                derivatives = level_derivatives(config.mlp, activations)
                gate = step_gate(config, index, level.weights, n, activations, derivatives)
                if gate is not None:
                    error = error * gate
                factors[index] = level_grad_factors(config.mlp, level.weights, n, activations,
                                                    error, derivatives)
            if config.variant == "independent":
                term = self.mix[index] * out
                mixed = term if mixed is None else mixed + term
            else:
                h = h + out
        y = x + mixed if config.variant == "independent" else h
        return y, factors

    def forward(self, x: torch.Tensor, state: ContinuumMemoryState | None = None, *,
                teach_hook: TeachHook | None = None
                ) -> tuple[torch.Tensor, ContinuumMemoryState]:
        """``teach_hook``: the LM teach-signal driver's hook, applied to the incoming state
        when ``config.teach_signal == "lm"`` (None: run the current weights)."""
        x = self._check_input(x)
        state = self.init_state(x.shape[0]) if state is None else self._check_state(state, x)
        state = _through_teach_hook(state, teach_hook)
        config = self.config
        local = config.teach_signal == "local" and config.learns_in_context
        levels = state.levels
        if not local:
            # Frozen, or the LM signal: weights are constant inside forward (the driver in
            # nestlearn.nn.teach_signal commits the LM gradients at the boundaries).
            y, _ = self._run_piece(x, levels, local=False)
            return y, ContinuumMemoryState(config, state.position + x.shape[1],
                                           state.batch_size, levels)
        run = self._run_pieces if config.variant == "nested" else self._run_levels
        y, levels = run(x, levels, state.position)
        return y, ContinuumMemoryState(config, state.position + x.shape[1], state.batch_size,
                                       levels)

    def _run_pieces(self, x: torch.Tensor, levels: tuple[CMSLevelState, ...], position: int
                    ) -> tuple[torch.Tensor, tuple[CMSLevelState, ...]]:
        """The local-signal forward cut at every level's chunk boundaries, all levels per
        piece (what the nested variant needs: a level restarts from a slower level's new
        weights)."""
        config = self.config
        outputs = []
        # Gradient factors of the pieces since each level's last boundary: summed in one
        # matmul per weight when the level changes (or at the end of the segment).
        pending: list[list[Factors]] = [[] for _ in levels]
        for start, stop in boundary_pieces(position, x.shape[1], config.chunk_sizes):
            piece = x[:, start - position:stop - position]
            y, factors = self._run_piece(piece, levels, local=True)
            outputs.append(y)
            for index, piece_factors in enumerate(factors):
                if piece_factors is not None:
                    pending[index].append(piece_factors)
            changing = [index for index in range(config.num_levels)
                        if _changes_at(config, index, stop)]
            levels = _flush(levels, pending, changing)
            levels = apply_boundaries(config, levels, stop)
        levels = _flush(levels, pending, range(config.num_levels))
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), levels

    def _run_levels(self, x: torch.Tensor, levels: tuple[CMSLevelState, ...], position: int
                    ) -> tuple[torch.Tensor, tuple[CMSLevelState, ...]]:
        """The local-signal forward of the sequential and independent variants, one level at
        a time over the whole segment, each cut only at its own chunk boundaries.

        No level reads a slower level (each reads x or the faster levels' sum) and, outside
        the nested variant, none takes another's weights, so a level's inputs over the whole
        segment are known before it runs: the same pieces' outputs and updates as cutting
        every level at every level's boundaries, with one call per chunk of each level
        instead of one per chunk of the fastest."""
        config = self.config
        result = list(levels)
        h, mixed = x, None
        for index, level in enumerate(levels):
            size = config.chunk_sizes[index]
            learns = config.level_learns(index)
            pieces = list(boundary_pieces(position, x.shape[1], (size,)))
            # The norm and the local target map are fixed within the segment (parameters, per
            # token): computed once for the whole segment, cut with one split each.
            normed = self.norms[index](x if config.variant == "independent" else h)
            targets = (normed @ self.local_targets[str(index)].transpose(0, 1)
                       if learns else normed)
            sizes = [stop - start for start, stop in pieces]
            outputs = []
            for (_, stop), n, target in zip(pieces, normed.split(sizes, 1),
                                            targets.split(sizes, 1), strict=True):
                if learns and stop % size:
                    # the chunk goes on after this segment: its gradients wait for its end
                    outputs.append(level_forward(config.mlp, level.weights, n)[0])
                    level = _hold(level, n, target, copy=len(pieces) > 1)
                    continue
                level, n, target, held = _release(level, n, target)
                out, factors = _level_piece_step(config, index, level.weights, n, target,
                                                 learns)
                outputs.append(out[:, held:] if held else out)
                if factors is not None:
                    level = _level_step(config, index, _flush_one(level, [factors]))
            result[index] = level
            out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
            if config.variant == "independent":
                term = self.mix[index] * out
                mixed = term if mixed is None else mixed + term
            else:
                h = h + out
        return (x + mixed if config.variant == "independent" else h), tuple(result)

    def forward_naive(self, x: torch.Tensor, state: ContinuumMemoryState | None = None, *,
                      teach_hook: TeachHook | None = None
                      ) -> tuple[torch.Tensor, ContinuumMemoryState]:
        """Token-by-token reference of ``forward`` (local signal; slow, for tests).

        Writes the MLP out directly and takes each token's gradient with autograd
        (``create_graph=True``, so outer gradients flow as in the fast path); updates a level
        when the position reaches a multiple of its chunk size.
        """
        x = self._check_input(x)
        state = self.init_state(x.shape[0]) if state is None else self._check_state(state, x)
        # held tokens as the gradient sum this reference keeps
        state = settled(_through_teach_hook(state, teach_hook))
        config = self.config
        batch = x.shape[0]
        local = config.teach_signal == "local" and config.learns_in_context
        weights = [list(level.weights) for level in state.levels]
        accs = [None if level.accumulator is None else list(level.accumulator)
                for level in state.levels]
        position = state.position
        outputs = []
        with torch.enable_grad():
            for t in range(x.shape[1]):
                xt = x[:, t]
                h = xt
                total = torch.zeros_like(xt)
                for index in range(config.num_levels):
                    learn = local and config.level_learns(index)
                    zeros = [torch.zeros(batch, *w.shape[-2:], dtype=w.dtype, device=w.device,
                                         requires_grad=True) for w in weights[index]] \
                        if learn else []
                    used = [w + z for w, z in zip(weights[index], zeros, strict=True)] \
                        if learn else weights[index]
                    n = self.norms[index](xt if config.variant == "independent" else h)
                    out = _naive_mlp(config.mlp, used, n)
                    if learn:
                        target = n @ self.local_targets[str(index)].transpose(0, 1)
                        squared = (out - target).pow(2)
                        # The step ceiling, from the weights without the probe zeros.
                        _, activations = level_forward(config.mlp, tuple(weights[index]),
                                                       n[:, None])
                        gate = step_gate(config, index, tuple(weights[index]), n[:, None],
                                         activations)
                        if gate is not None:
                            squared = squared * gate[:, 0]
                        loss = 0.5 * squared.sum()
                        grads = torch.autograd.grad(loss, zeros, create_graph=True)
                        accs[index] = list(grads) if accs[index] is None else [
                            a + g for a, g in zip(accs[index], grads, strict=True)]
                    if config.variant == "independent":
                        total = total + self.mix[index] * out
                    else:
                        h = h + out
                outputs.append(xt + total if config.variant == "independent" else h)
                position += 1
                if not local:
                    continue
                for index in range(config.num_levels):
                    if position % config.chunk_sizes[index] == 0 and accs[index] is not None:
                        rate = config.level_inner_lr[index]
                        weights[index] = [w - rate * a
                                          for w, a in zip(weights[index], accs[index],
                                                          strict=True)]
                        accs[index] = None
                if config.variant == "nested":
                    for index in range(config.num_levels - 2, -1, -1):
                        if position % config.chunk_sizes[index + 1] == 0:
                            weights[index] = list(weights[index + 1])
                            accs[index] = None
        # Without in-context learning the state's levels are handed back as they came (the
        # LM teach-signal driver recognizes them by identity).
        levels = tuple(CMSLevelState(tuple(w), None if a is None else tuple(a))
                       for w, a in zip(weights, accs, strict=True)) if local else state.levels
        return torch.stack(outputs, dim=1), ContinuumMemoryState(config, position, batch, levels)


def _naive_mlp(kind: str, weights: list[torch.Tensor], n: torch.Tensor) -> torch.Tensor:
    """One token's MLP, ``n [B, D]``, weights shared ``[out, in]`` or per batch ``[B, out, in]``."""

    def apply(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oi,bi->bo" if w.dim() == 2 else "boi,bi->bo", w, v)

    if kind == "swiglu":
        w_gate, w_up, w_down = weights
        return apply(w_down, torch.nn.functional.silu(apply(w_gate, n)) * apply(w_up, n))
    w_in, w_out = weights
    return apply(w_out, torch.nn.functional.gelu(apply(w_in, n)))
