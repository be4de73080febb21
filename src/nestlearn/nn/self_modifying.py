"""Self-modifying Titans, the sequence mixer of HOPE (docs/paper.md section 5; arXiv sec. 8).

Every projection but q is itself a memory learned in context. Per chunk of ``inner_chunk_size``
tokens, the memories {k, v, eta, alpha} at the end of the previous chunk produce

    k_t = normalize(M_k(x_t^k)),  v_t = M_v(x_t^v),
    eta_t = eta_max * sigmoid(<w_eta, M_eta(x_t^eta)> + b_eta),
    alpha_t = sigmoid(<w_alpha, M_alpha(x_t^alpha)> + b_alpha),

and their self-generated targets v_hat_{*,t} = M_*(v_t). At the chunk's end each of them takes
the chunk's DGD steps with weight decay (and optional momentum) on
L(M_*; k_t, v_hat_{*,t}) = 1/2 ||M_*(k_t) - v_hat_{*,t}||^2, all gradients at the chunk-start
state (the dual form). The main memory runs over the sequence with its own ``chunk_size`` on
(q_t, k_t, v_t, alpha_t, eta_t): o_t = M_memory,t(q_t), q_t = normalize(x_t W_q) the only
non-adaptive projection. Each memory is a residual MLP whose initial state is a parameter
(meta-learned). The four inner memories run as one stacked memory of 4H heads. See
MEMORY_LAYERS.md for the choices where the paper leaves room.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import check_bool, check_choice, check_int, check_positive, invalid
from nestlearn.nn.conv import CausalDepthwiseConv
from nestlearn.nn.memory_common import (
    ACTIVATIONS,
    CappedLinear,
    HeadRMSNorm,
    capped_logit_inverse,
    check_gate_options,
    check_tail,
    derived_eta_max,
    logit,
    resolve_head_dim,
)
from nestlearn.nn.memory_stream import ChunkedMemoryState, empty_chunked_state, run_chunked_memory
from nestlearn.nn.transformer import check_input
from nestlearn.ops.deep_memory import (
    DeepMemoryState,
    deep_memory,
    deep_memory_apply,
    deep_memory_naive,
    deep_memory_update,
    init_deep_memory_weights,
)
from nestlearn.state import TreeState, state_dataclass, static_field

# Order of the inner memories along the stacked head axis.
INNER_MEMORIES = ("k", "v", "eta", "alpha")
# What the main memory learns to output for k_t: v_t, or its own v_hat = M_memory(v_t).
MEMORY_TARGETS = ("v", "self")


@dataclass(frozen=True)
class SelfModifyingTitansConfig:
    """Configuration of :class:`SelfModifyingTitans`.

    Attributes:
        dim: model width D.
        heads: number of heads H (each memory is per head).
        head_dim: width of each head (default ``dim // heads``).
        depth, expansion: layers and hidden multiple of the main memory MLP.
        inner_depth, inner_expansion: the same for the k, v, eta, alpha memories (paper: 2 layers).
        chunk_size: chunk of the main memory.
        inner_chunk_size: chunk shared by the k, v, eta, alpha memories.
        momentum: momentum in every memory's update (theta_t = sigmoid(cap(x W_theta + b))
            < theta_max, from a plain projection, not a memory); off = plain DGD steps.
        weight_decay: the retention gate alpha_t (off = alpha 1).
        dgd: delta gradient descent (the (alpha I - eta k k^T) factor); off = gradient descent.
        activation: the memories' non-linearity.
        input_projection: each inner memory reads its own linear projection of x (``x W_*``);
            off = they all read x split into heads (needs ``dim == heads * head_dim``).
        normalize_inputs: L2-normalize each head of the memories' inputs (after the conv).
        normalize_values: L2-normalize each head of v_t = M_v(x^v_t) before it becomes the
            main memory's value and the source of every self-generated target M_*(v_t). Off
            (the layer's default, the paper's literal reading) the targets carry the v
            memory's gain, which the memories then learn, a loop that outer training can
            drive to overflow; the models turn it on (MEMORY_LAYERS.md, "Stability").
        conv, conv_width: depthwise causal conv on the memories' inputs and on q.
        eta_max: upper end of the learning rate eta_t. None (default): derived from
            ``chunk_step`` with the larger of the two chunk sizes and of the two expansions
            (``nestlearn.nn.memory_common.derived_eta_max``; one eta_t drives all five
            memories). The number in use is ``resolved_eta_max``.
        chunk_step: the largest fraction of the error a chunk of identical unit keys can remove
            with eta and theta at their maxima (only used to derive ``eta_max``).
        theta_max: soft cap of the momentum gate (theta_t < theta_max).
        eta_init, theta_init, forget_init: the gates at initialization (eta_t / eta_max,
            theta_t, 1 - alpha_t), set through the biases.
        output_gate: multiply the read-out by SiLU(x W_g) before the output projection.
        memory_target: the main memory's values: ``"v"`` the generated v_t (as in Titans) or
            ``"self"`` its own v_hat_t = M_memory(v_t) from its state at the start of its chunk.
        use_naive: per-token reference ops instead of the chunkwise ones (for tests).
    """

    dim: int
    heads: int = 1
    head_dim: int | None = None
    depth: int = 2
    expansion: int = 4
    inner_depth: int = 2
    inner_expansion: int = 4
    chunk_size: int = 64
    inner_chunk_size: int = 64
    momentum: bool = True
    weight_decay: bool = True
    dgd: bool = True
    activation: str = "gelu"
    input_projection: bool = True
    normalize_inputs: bool = True
    normalize_values: bool = False
    conv: bool = True
    conv_width: int = 4
    eta_max: float | None = None
    chunk_step: float = 1.0
    theta_max: float = 0.9
    eta_init: float = 0.5
    theta_init: float = 0.5
    forget_init: float = 0.0001
    output_gate: bool = True
    memory_target: str = "v"
    use_naive: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_dim",
                           resolve_head_dim(self.dim, self.heads, self.head_dim))
        for name in ("depth", "inner_depth"):
            check_int(name, getattr(self, name), 2)
        for name in ("expansion", "inner_expansion", "chunk_size", "inner_chunk_size",
                     "conv_width"):
            check_int(name, getattr(self, name), 1)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("memory_target", self.memory_target, MEMORY_TARGETS)
        check_gate_options(self)
        if self.eta_max is not None:
            check_positive("eta_max", self.eta_max)
        for name in ("momentum", "weight_decay", "dgd", "input_projection", "normalize_inputs",
                     "normalize_values", "conv", "output_gate", "use_naive"):
            check_bool(name, getattr(self, name))
        if not self.input_projection and self.dim != self.heads * self.head_dim:
            raise invalid("input_projection", False,
                          f"True unless dim ({self.dim}) == heads * head_dim "
                          f"({self.heads * self.head_dim})")

    @property
    def resolved_eta_max(self) -> float:
        """``eta_max``, or the ceiling derived from ``chunk_step`` with the larger chunk size and
        expansion when it is None."""
        if self.eta_max is not None:
            return self.eta_max
        return derived_eta_max(self.chunk_step, max(self.chunk_size, self.inner_chunk_size),
                               max(self.expansion, self.inner_expansion),
                               self.theta_max if self.momentum else None)


@state_dataclass
class SelfModifyingTitansState(TreeState):
    """Stream state of :class:`SelfModifyingTitans`.

    ``inner``: the stacked k, v, eta, alpha memories (4H heads, in ``INNER_MEMORIES`` order) at
    the start of the current inner chunk, with that chunk's keys, targets and gates so far;
    ``memory``: the main memory at the start of its current chunk, with its pending tokens;
    ``conv_tail``: the convolution's last inputs (None without conv); ``position``: tokens seen.
    """

    inner: ChunkedMemoryState
    memory: ChunkedMemoryState
    conv_tail: torch.Tensor | None
    position: int = static_field()


class SelfModifyingTitans(nn.Module):
    """``forward(x [B, T, D], state) -> (y [B, T, D], state)``; chained segments = one pass."""

    def __init__(self, config: SelfModifyingTitansConfig) -> None:
        super().__init__()
        if not isinstance(config, SelfModifyingTitansConfig):
            raise invalid("config", type(config).__name__, "a SelfModifyingTitansConfig")
        self.config = config
        c = config
        inner = c.heads * c.head_dim
        self.q = nn.Linear(c.dim, inner, bias=False)
        self.inputs = nn.Linear(c.dim, 4 * inner, bias=False) if c.input_projection else None
        conv_channels = 2 * inner if self.inputs is None else 5 * inner
        self.conv = CausalDepthwiseConv(conv_channels, c.conv_width) if c.conv else None
        # theta_t = sigmoid(self.theta(x)) < theta_max: the logit is soft-capped.
        self.theta = CappedLinear(c.dim, c.heads, c.theta_max) if c.momentum else None
        # Read-outs of the eta and alpha memories: a per-head projection to a scalar logit.
        self.eta_readout = nn.Parameter(torch.randn(c.heads, c.head_dim) * c.head_dim ** -0.5)
        self.eta_bias = nn.Parameter(torch.full((c.heads,), logit(c.eta_init)))
        if c.weight_decay:
            self.alpha_readout = nn.Parameter(
                torch.randn(c.heads, c.head_dim) * c.head_dim ** -0.5)
            self.alpha_bias = nn.Parameter(torch.full((c.heads,), -logit(c.forget_init)))
        else:
            # alpha is 1: the alpha memory still learns in the stack but nothing reads it.
            self.alpha_readout = self.alpha_bias = None
        self.norm = HeadRMSNorm(c.heads, c.head_dim)
        self.out_gate = nn.Linear(c.dim, inner, bias=False) if c.output_gate else None
        self.out = nn.Linear(inner, c.dim, bias=False)
        main = init_deep_memory_weights(c.heads, c.head_dim, c.expansion * c.head_dim, c.depth)
        self.memory_weights = nn.ParameterList([nn.Parameter(w.clone()) for w in main])
        stacked = [init_deep_memory_weights(c.heads, c.head_dim, c.inner_expansion * c.head_dim,
                                            c.inner_depth) for _ in INNER_MEMORIES]
        self.inner_weights = nn.ParameterList(
            [nn.Parameter(torch.cat(layer, 0).clone()) for layer in zip(*stacked, strict=True)])
        if self.theta is not None:
            with torch.no_grad():
                self.theta.bias.fill_(capped_logit_inverse(c.theta_init, c.theta_max))

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> SelfModifyingTitansState:
        """The state of an empty stream: meta-learned initial memories, nothing pending."""
        check_int("batch", batch, 1)
        c = self.config
        like = self.memory_weights[0]
        like = like.new_zeros(()).to(device=device or like.device, dtype=dtype or like.dtype)
        inner = empty_chunked_state(DeepMemoryState(tuple(self.inner_weights), None), batch,
                                    4 * c.heads, c.head_dim, c.momentum, like)
        memory = empty_chunked_state(DeepMemoryState(tuple(self.memory_weights), None), batch,
                                     c.heads, c.head_dim, c.momentum, like)
        tail = (self.conv.init_tail(batch, device=like.device, dtype=like.dtype)
                if self.conv is not None else None)
        return SelfModifyingTitansState(inner, memory, tail, 0)

    def _features(self, x: torch.Tensor, tail: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """q ``[B, T, H, Dh]``, the inner memories' inputs ``[B, T, 4H, Dh]``, the conv tail."""
        c = self.config
        if self.inputs is None:
            features = torch.cat([self.q(x), x], -1)
        else:
            features = torch.cat([self.q(x), self.inputs(x)], -1)
        if self.conv is not None:
            features, tail = self.conv(features, tail)
        inner = c.heads * c.head_dim
        q = F.normalize(features[..., :inner].unflatten(-1, (c.heads, c.head_dim)), dim=-1)
        reads = features[..., inner:].unflatten(-1, (-1, c.head_dim))
        if self.inputs is None:
            reads = reads.repeat(1, 1, 4, 1)  # every inner memory reads the same x
        if c.normalize_inputs:
            # Unit-norm inputs, like the unit-norm keys the memories are trained on: otherwise
            # the self-generated targets M(v) carry the input's scale and the memories' gain
            # grows chunk after chunk (see MEMORY_LAYERS.md).
            reads = F.normalize(reads, dim=-1)
        return q, reads, tail

    def _inner_update(self, state: ChunkedMemoryState) -> DeepMemoryState:
        """The inner memories after the DGD steps of their completed chunk (docs/paper.md 5)."""
        c = self.config
        memory = state.chunk_start
        if c.use_naive:
            # The per-token reference over one chunk ends in the same state as the closed form.
            _, final = deep_memory_naive(
                state.keys, state.keys, state.values, state.alpha, state.eta, state.theta,
                initial_state=memory, objective="l2", activation=c.activation, dgd=c.dgd,
                output_final_state=True, chunk_size=c.inner_chunk_size, check_values=False)
            return final
        # Gates come from sigmoids: their values are checked only under nestlearn.debug_checks
        # (each check is a device sync, and this runs once per inner chunk).
        return deep_memory_update(memory, state.keys, state.values, state.alpha, state.eta,
                                  state.theta, objective="l2", activation=c.activation,
                                  dgd=c.dgd, check_values=False)

    def _run_inner(self, reads: torch.Tensor, theta: torch.Tensor | None,
                   state: ChunkedMemoryState
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              ChunkedMemoryState]:
        """k, v ``[B, T, H, Dh]``, alpha, eta ``[B, T, H]`` from the inner memories, and their
        state after the segment. Each inner chunk reads the memories as they were at its start.
        """
        c = self.config
        batch, length = reads.shape[:2]
        pieces: list[tuple[torch.Tensor, ...]] = []
        # Pieces end where the inner chunks end. torch.split, not slicing in the loop: its
        # backward writes every piece's gradient into one tensor, where each slice's backward
        # would allocate and fill a zero gradient of the whole segment (O(T^2 / C) traffic).
        first = min(length, c.inner_chunk_size - state.pending)
        rest = length - first
        sizes = [first] + [c.inner_chunk_size] * (rest // c.inner_chunk_size)
        if rest % c.inner_chunk_size:
            sizes.append(rest % c.inner_chunk_size)
        read_pieces = reads.split(sizes, dim=1)
        theta_pieces = theta.split(sizes, dim=1) if theta is not None else [None] * len(sizes)
        for piece_reads, piece_theta in zip(read_pieces, theta_pieces, strict=True):
            weights = state.chunk_start.weights
            out = deep_memory_apply(weights, piece_reads, activation=c.activation)
            k_raw, v, eta_features, alpha_features = out.chunk(4, dim=2)
            k = F.normalize(k_raw, dim=-1)
            if c.normalize_values:
                v = F.normalize(v, dim=-1)
            eta = c.resolved_eta_max * torch.sigmoid(
                (eta_features * self.eta_readout).sum(-1) + self.eta_bias)
            if c.weight_decay:
                alpha = torch.sigmoid((alpha_features * self.alpha_readout).sum(-1)
                                      + self.alpha_bias)
            else:
                alpha = torch.ones_like(eta)
            # Self-generated targets v_hat_* = M_*(v_t), one per inner memory.
            targets = deep_memory_apply(weights, v.repeat(1, 1, 4, 1), activation=c.activation)
            state = ChunkedMemoryState(
                state.chunk_start,
                torch.cat([state.keys, k.repeat(1, 1, 4, 1)], 1),
                torch.cat([state.values, targets], 1),
                torch.cat([state.alpha, alpha.repeat(1, 1, 4)], 1),
                torch.cat([state.eta, eta.repeat(1, 1, 4)], 1),
                None if theta is None else torch.cat([state.theta, piece_theta.repeat(1, 1, 4)],
                                                     1))
            if state.pending == c.inner_chunk_size:
                state = empty_chunked_state(self._inner_update(state), batch, 4 * c.heads,
                                            c.head_dim, c.momentum, reads)
            pieces.append((k, v, alpha, eta))
        k, v, alpha, eta = (torch.cat(parts, 1) for parts in zip(*pieces, strict=True))
        return k, v, alpha, eta, state

    def _self_targets(self, memory: DeepMemoryState, values: torch.Tensor) -> torch.Tensor:
        """The main memory's own targets v_hat = M_memory(v) (``memory_target="self"``)."""
        return deep_memory_apply(memory.weights, values, activation=self.config.activation)

    def forward(self, x: torch.Tensor, state: SelfModifyingTitansState | None = None
                ) -> tuple[torch.Tensor, SelfModifyingTitansState]:
        c = self.config
        x = check_input(x, c.dim, self.q.weight.dtype)
        batch, length, _ = x.shape
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        elif not isinstance(state, SelfModifyingTitansState):
            raise invalid("state", type(state).__name__, "a SelfModifyingTitansState or None")
        state.inner.check("state.inner", batch, 4 * c.heads, c.head_dim, x.dtype,
                          c.inner_chunk_size, c.momentum)
        state.memory.check("state.memory", batch, c.heads, c.head_dim, x.dtype, c.chunk_size,
                           c.momentum)
        check_tail(state.conv_tail, self.conv, batch)
        q, reads, tail = self._features(x, state.conv_tail)
        theta = torch.sigmoid(self.theta(x)) if self.theta is not None else None
        k, v, alpha, eta, inner = self._run_inner(reads, theta, state.inner)
        op = deep_memory_naive if c.use_naive else deep_memory
        value_map = self._self_targets if c.memory_target == "self" else None
        o, memory = run_chunked_memory(op, state.memory, q, k, v, alpha, eta, theta,
                                       chunk_size=c.chunk_size, value_map=value_map,
                                       objective="l2", activation=c.activation, dgd=c.dgd,
                                       check_values=False)
        o = self.norm(o).flatten(2)
        if self.out_gate is not None:
            o = o * F.silu(self.out_gate(x))
        return self.out(o), SelfModifyingTitansState(inner, memory, tail, state.position + length)
