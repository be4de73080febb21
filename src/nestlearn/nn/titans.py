"""Titans long-term neural memory as a layer (docs/paper.md section 4; Titans, arXiv 2501.00663).

x -> q, k, v projections -> depthwise causal conv (width 4) -> SiLU -> L2-normalized q, k ->
deep residual MLP memory per head, learned in context by gradient steps with data-dependent
learning rate eta_t, momentum theta_t and retention alpha_t (``nestlearn.ops.deep_memory``)
-> read-out o_t = M_t(q_t) -> per-head RMSNorm -> output gate SiLU(x W_g) -> output projection.
The memory's initial weights are ordinary parameters (meta-learned by the outer optimizer).
See MEMORY_LAYERS.md for the choices where the paper leaves room.
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
    OBJECTIVES,
    READOUTS,
    HeadRMSNorm,
    MemoryInputs,
    capped_logit,
    capped_logit_inverse,
    check_gate_options,
    check_tail,
    derived_eta_max,
    logit,
    resolve_head_dim,
    run_memory,
)
from nestlearn.nn.memory_stream import ChunkedMemoryState, empty_chunked_state
from nestlearn.nn.transformer import check_input
from nestlearn.nn.unit_norm import unit_normalize
from nestlearn.ops.deep_memory import (
    DeepMemoryState,
    deep_memory,
    deep_memory_naive,
    init_deep_memory_weights,
)
from nestlearn.state import TreeState, state_dataclass, static_field


@dataclass(frozen=True)
class NeuralMemoryConfig:
    """Configuration of :class:`NeuralMemory`.

    Attributes:
        dim: model width D of the input and output.
        heads: number of independent memories H.
        head_dim: width of each memory (default ``dim // heads``).
        depth: matrices in each memory MLP, >= 2 (M(x) = x + W_L s(... s(W_1 x)))).
        expansion: hidden width of the memory MLP as a multiple of ``head_dim``.
        chunk_size: tokens whose gradients are taken at the same (chunk-start) memory state.
        momentum: use the surprise momentum S_t (theta_t gate); off = plain gradient steps.
        weight_decay: use the forgetting gate (retention alpha_t = 1 - forget_t); off = alpha 1.
        objective: inner loss, ``"l2"`` 1/2 ||M(k) - v||^2 or ``"dot"`` -<M(k), v>.
        activation: the memory MLP's non-linearity.
        conv: depthwise causal convolution after the q/k/v projections.
        conv_width: its width (4 in the paper).
        persistent_tokens: learnable tokens fed to the memory once, at the start of a stream.
        eta_max: the learning-rate gate is eta_t = eta_max * sigmoid(x W_eta + b). None
            (default): derived from ``chunk_step`` (``derived_eta_max``), so the bound on a
            whole chunk's step holds whatever the chunk size, memory width and momentum cap.
            The number in use is ``resolved_eta_max`` (the field keeps what was asked for, so
            a changed chunk size re-derives it).
        chunk_step: the largest fraction of the error a chunk of identical unit keys can remove
            with eta and theta at their maxima (only used to derive ``eta_max``).
        theta_max: soft cap of the momentum gate (theta_t < theta_max), bounding the momentum's
            amplification 1 / (1 - theta_t) of the steps.
        normalize_values: L2-normalize each head of the values v, like the keys: the memory
            then maps unit vectors to unit vectors and its weights keep the scale they start
            with, whatever the input's scale.
        eta_init, theta_init, forget_init: the gates' values at initialization (as fractions:
            eta_t / eta_max, theta_t, forget_t = 1 - alpha_t), set through the biases.
        dgd: delta gradient descent (the (alpha I - eta k k^T) factor of HOPE) in the update.
        readout: ``"after_update"`` (default) o_t = M_t(q_t), after token t's own update;
            ``"chunk_start"`` o_t = M_{t'}(q_t), the memory at the start of t's chunk (Eq. 90).
        use_naive: run the per-token reference op instead of the chunkwise one (for tests).
    """

    dim: int
    heads: int = 1
    head_dim: int | None = None
    depth: int = 2
    expansion: int = 4
    chunk_size: int = 64
    momentum: bool = True
    weight_decay: bool = True
    objective: str = "l2"
    activation: str = "gelu"
    conv: bool = True
    conv_width: int = 4
    persistent_tokens: int = 0
    eta_max: float | None = None
    chunk_step: float = 1.0
    theta_max: float = 0.9
    normalize_values: bool = True
    eta_init: float = 0.5
    theta_init: float = 0.5
    forget_init: float = 0.0001
    dgd: bool = False
    readout: str = "after_update"
    use_naive: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "head_dim",
                           resolve_head_dim(self.dim, self.heads, self.head_dim))
        check_choice("readout", self.readout, READOUTS)
        check_int("depth", self.depth, 2)
        check_int("expansion", self.expansion, 1)
        check_int("chunk_size", self.chunk_size, 1)
        check_int("conv_width", self.conv_width, 1)
        check_int("persistent_tokens", self.persistent_tokens, 0)
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_gate_options(self)
        if self.eta_max is not None:
            check_positive("eta_max", self.eta_max)
        for name in ("momentum", "weight_decay", "conv", "dgd", "use_naive",
                     "normalize_values"):
            check_bool(name, getattr(self, name))

    @property
    def hidden(self) -> int:
        return self.expansion * self.head_dim

    @property
    def resolved_eta_max(self) -> float:
        """``eta_max``, or the ceiling derived from ``chunk_step`` when it is None."""
        if self.eta_max is not None:
            return self.eta_max
        return derived_eta_max(self.chunk_step, self.chunk_size, self.expansion,
                               self.theta_max if self.momentum else None)


@state_dataclass
class NeuralMemoryState(TreeState):
    """Stream state of :class:`NeuralMemory`.

    ``memory`` is the memory at the start of the current chunk with the pending tokens of that
    chunk (see ``nestlearn.nn.memory_stream``); ``conv_tail`` the last ``conv_width - 1``
    projections (None without conv); ``position`` the number of input tokens seen.
    """

    memory: ChunkedMemoryState
    conv_tail: torch.Tensor | None
    position: int = static_field()


class NeuralMemory(nn.Module):
    """Titans long-term memory layer: ``forward(x [B, T, D], state) -> (y [B, T, D], state)``."""

    def __init__(self, config: NeuralMemoryConfig) -> None:
        super().__init__()
        if not isinstance(config, NeuralMemoryConfig):
            raise invalid("config", type(config).__name__, "a NeuralMemoryConfig")
        self.config = config
        c = config
        inner = c.heads * c.head_dim
        self.qkv = nn.Linear(c.dim, 3 * inner, bias=False)
        self.conv = CausalDepthwiseConv(3 * inner, c.conv_width) if c.conv else None
        # One projection gives the three gate logits per head: eta, theta, forget.
        self.gates = nn.Linear(c.dim, 3 * c.heads)
        self.out_gate = nn.Linear(c.dim, inner, bias=False)
        self.norm = HeadRMSNorm(c.heads, c.head_dim)
        self.out = nn.Linear(inner, c.dim, bias=False)
        initial = init_deep_memory_weights(c.heads, c.head_dim, c.hidden, c.depth)
        self.memory_weights = nn.ParameterList([nn.Parameter(w.clone()) for w in initial])
        self.persistent = (nn.Parameter(torch.randn(c.persistent_tokens, c.dim) * 0.02)
                           if c.persistent_tokens else None)
        with torch.no_grad():
            # The gates start at eta_init * eta_max, theta_init and forget_init (sigmoid^-1).
            bias = self.gates.bias.view(3, c.heads)
            bias[0].fill_(logit(c.eta_init))
            bias[1].fill_(capped_logit_inverse(c.theta_init, c.theta_max))
            bias[2].fill_(logit(c.forget_init))

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> NeuralMemoryState:
        """The state of an empty stream (the meta-learned initial memory, no pending tokens)."""
        check_int("batch", batch, 1)
        c = self.config
        like = self.memory_weights[0]
        like = like.new_zeros(()).to(device=device or like.device, dtype=dtype or like.dtype)
        memory = DeepMemoryState(tuple(self.memory_weights), None)
        chunked = empty_chunked_state(memory, batch, c.heads, c.head_dim, c.momentum, like)
        tail = (self.conv.init_tail(batch, device=like.device, dtype=like.dtype)
                if self.conv is not None else None)
        return NeuralMemoryState(chunked, tail, 0)

    def gate_values(self, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(alpha, eta, theta)`` per token and head, each ``[B, T, H]``, in their ranges.

        eta in (0, eta_max), theta in (0, theta_max) (None without momentum), alpha = 1 - forget in
        (0, 1) (exactly 1 without weight decay).
        """
        c = self.config
        logits = self.gates(x).unflatten(-1, (3, c.heads))
        eta = c.resolved_eta_max * torch.sigmoid(logits[..., 0, :])
        theta = (torch.sigmoid(capped_logit(logits[..., 1, :], c.theta_max))
                 if c.momentum else None)
        # alpha = 1 - sigmoid(forget logit), written as sigmoid(-logit) to avoid cancellation
        alpha = torch.sigmoid(-logits[..., 2, :]) if c.weight_decay else torch.ones_like(eta)
        return alpha, eta, theta

    def memory_inputs(self, stream: torch.Tensor, tail: torch.Tensor | None
                      ) -> tuple[MemoryInputs, torch.Tensor | None]:
        """What the memory reads and learns from ``stream`` [B, T, D] (persistent tokens
        included), and the conv tail after it."""
        c = self.config
        projected = self.qkv(stream)
        if self.conv is not None:
            projected, tail = self.conv(projected, tail)
        q, k, v = F.silu(projected).unflatten(-1, (3, c.heads, c.head_dim)).unbind(2)
        q = unit_normalize(q)
        k = unit_normalize(k)
        if c.normalize_values:
            v = unit_normalize(v)
        alpha, eta, theta = self.gate_values(stream)
        return MemoryInputs(q, k, v, alpha, eta, theta), tail

    def forward(self, x: torch.Tensor, state: NeuralMemoryState | None = None
                ) -> tuple[torch.Tensor, NeuralMemoryState]:
        c = self.config
        x = check_input(x, c.dim, self.qkv.weight.dtype)
        batch, length, _ = x.shape
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        elif not isinstance(state, NeuralMemoryState):
            raise invalid("state", type(state).__name__, "a NeuralMemoryState or None")
        state.memory.check("state.memory", batch, c.heads, c.head_dim, x.dtype, c.chunk_size,
                           c.momentum)
        check_tail(state.conv_tail, self.conv, batch)
        stream = x
        if self.persistent is not None and state.position == 0:
            # Persistent memory: learnable tokens the memory reads once, before the stream.
            prefix = self.persistent.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
            stream = torch.cat([prefix, x], 1)
        (q, k, v, alpha, eta, theta), tail = self.memory_inputs(stream, state.conv_tail)
        op = deep_memory_naive if c.use_naive else deep_memory
        # The gates are in range by construction (sigmoids): reading them back would cost a
        # device sync per chunk, so only nestlearn.debug_checks does.
        o, memory = run_memory(op, state.memory, q, k, v, alpha, eta, theta,
                               chunk_size=c.chunk_size, readout=c.readout,
                               objective=c.objective, activation=c.activation, dgd=c.dgd,
                               check_values=False)
        o = self.norm(o[:, o.shape[1] - length:]).flatten(2)
        y = self.out(o * F.silu(self.out_gate(x)))
        return y, NeuralMemoryState(memory, tail, state.position + length)
