"""Which block each architecture stacks: ``make_block(config)``.

Every block maps ``(x [B, T, D], state) -> (y [B, T, D], state)`` with its residual
connections inside, so the LM is only embedding, blocks, final norm and head.
- ``transformer``: ``TransformerBlock`` (attention + SwiGLU).
- ``titans`` (Titans LMM, memory as a layer): ``x + memory(norm(x))`` then
  ``x + swiglu(norm(x))``.
- ``titans-mag`` (Titans MAG, memory as a gate): a sliding-window attention branch and a
  neural-memory branch read the same normalized input and are combined by a gate (below).
- ``hope``: ``HOPEBlock`` (self-modifying Titans + CMS); ``hope-attention``:
  ``HOPEAttentionBlock`` (softmax attention + CMS).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nestlearn.errors import invalid
from nestlearn.models.config import ModelConfig
from nestlearn.nn.cms import CMSConfig
from nestlearn.nn.hope import HOPEAttentionBlock
from nestlearn.nn.hope_block import HOPEBlock
from nestlearn.nn.self_modifying import SelfModifyingTitansConfig
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from nestlearn.nn.transformer import (
    AttentionState,
    CausalSelfAttention,
    RMSNorm,
    SwiGLU,
    TransformerBlock,
)
from nestlearn.state import TreeState, state_dataclass


def _out_std(config: ModelConfig) -> float:
    return config.init_std / math.sqrt(2 * config.layers)


def _gate_options(config: ModelConfig) -> dict[str, float | None]:
    """The memories' gate parameterization (nestlearn/nn/MEMORY_LAYERS.md, "Stability")."""
    return dict(eta_max=config.memory_eta_max, chunk_step=config.memory_chunk_step,
                theta_max=config.memory_theta_max, eta_init=config.memory_eta_init,
                theta_init=config.memory_theta_init, forget_init=config.memory_forget_init)


def neural_memory_config(config: ModelConfig) -> NeuralMemoryConfig:
    """The Titans memory of one block, from the model's memory fields."""
    return NeuralMemoryConfig(
        dim=config.dim, heads=config.heads, depth=config.memory_depth,
        expansion=config.memory_expansion, chunk_size=config.chunk_size,
        momentum=config.memory_momentum, weight_decay=config.memory_weight_decay,
        dgd=config.uses_memory_dgd, persistent_tokens=config.persistent_tokens,
        normalize_values=config.memory_normalize_values, **_gate_options(config))


def self_modifying_config(config: ModelConfig) -> SelfModifyingTitansConfig:
    """The self-modifying Titans mixer of one HOPE block."""
    return SelfModifyingTitansConfig(
        dim=config.dim, heads=config.heads, depth=config.memory_depth,
        expansion=config.memory_expansion, chunk_size=config.chunk_size,
        inner_chunk_size=config.inner_chunk_size, momentum=config.memory_momentum,
        weight_decay=config.memory_weight_decay, dgd=config.uses_memory_dgd,
        normalize_values=config.memory_normalize_values, **_gate_options(config))


def cms_config(config: ModelConfig) -> CMSConfig:
    """The Continuum Memory System of one HOPE / HOPE-attention block."""
    return CMSConfig(
        dim=config.dim, chunk_sizes=config.cms_chunk_sizes, hidden=config.cms_hidden,
        mlp=config.cms_mlp, variant=config.cms_variant, teach_signal=config.cms_teach_signal,
        inner_lr=config.cms_inner_lr, frozen=config.cms_frozen, norm_eps=config.norm_eps,
        init_std=config.init_std, out_init_std=_out_std(config))


class MemoryBlock(nn.Module):
    """Titans LMM block: ``x + memory(norm(x))`` then ``x + swiglu(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.memory_norm = RMSNorm(config.dim, config.norm_eps)
        self.memory = NeuralMemory(neural_memory_config(config))
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.mlp_hidden, config.init_std, _out_std(config))

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> NeuralMemoryState:
        return self.memory.init_state(batch, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: NeuralMemoryState | None = None
                ) -> tuple[torch.Tensor, NeuralMemoryState]:
        mixed, state = self.memory(self.memory_norm(x), state)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


@state_dataclass
class GatedMemoryState(TreeState):
    """State of a ``GatedMemoryBlock``: the attention window's KV cache and the neural
    memory's state (None: that part's fresh state)."""

    attention: AttentionState | None
    neural_memory: NeuralMemoryState | None


class GatedMemoryBlock(nn.Module):
    """Titans MAG block: sliding-window attention and neural memory combined by a gate.

    With ``n = norm(x)``, ``a = SWA(n)``, ``m = memory(n)``:
    ``x + W_o (norm_a(a) * sigmoid(norm_m(m)))`` then ``x + swiglu(norm(x))``.
    Titans (section 4.2) normalizes both branches with learnable vector weights and combines
    them by a non-linear gate; here the memory branch, squashed, gates the attention branch
    channel by channel, the choice of the common open implementations.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.dim
        self.norm = RMSNorm(dim, config.norm_eps)
        self.attn = CausalSelfAttention(dim, config.heads, config.window, config.rope_base,
                                        config.init_std)
        self.memory = NeuralMemory(neural_memory_config(config))
        self.attn_out_norm = RMSNorm(dim, config.norm_eps)
        self.memory_out_norm = RMSNorm(dim, config.norm_eps)
        self.out = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.out.weight, std=_out_std(config))
        self.mlp_norm = RMSNorm(dim, config.norm_eps)
        self.mlp = SwiGLU(dim, config.mlp_hidden, config.init_std, _out_std(config))

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> GatedMemoryState:
        return GatedMemoryState(self.attn.init_state(batch, device=device, dtype=dtype),
                                self.memory.init_state(batch, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: GatedMemoryState | None = None
                ) -> tuple[torch.Tensor, GatedMemoryState]:
        if state is None:
            state = GatedMemoryState(None, None)
        elif not isinstance(state, GatedMemoryState):
            raise invalid("state", type(state).__name__, "a GatedMemoryState or None")
        n = self.norm(x)
        attended, attention = self.attn(n, state.attention)
        remembered, memory = self.memory(n, state.neural_memory)
        gate = torch.sigmoid(self.memory_out_norm(remembered))
        x = x + self.out(self.attn_out_norm(attended) * gate)
        return x + self.mlp(self.mlp_norm(x)), GatedMemoryState(attention, memory)


def make_transformer_block(config: ModelConfig) -> TransformerBlock:
    """The Transformer++ block of one layer, from the model's fields."""
    return TransformerBlock(config.dim, config.heads, config.mlp_hidden, window=config.window,
                            rope_base=config.rope_base, norm_eps=config.norm_eps,
                            init_std=config.init_std, num_layers=config.layers)


def make_block(config: ModelConfig) -> nn.Module:
    """One block of ``config.arch`` (every layer's block is built alike)."""
    if config.arch == "transformer":
        return make_transformer_block(config)
    if config.arch == "titans":
        return MemoryBlock(config)
    if config.arch == "titans-mag":
        return GatedMemoryBlock(config)
    if config.arch == "hope":
        return HOPEBlock(self_modifying_config(config), cms_config(config), config.norm_eps)
    if config.arch == "hope-attention":
        return HOPEAttentionBlock(config.dim, config.heads, cms_config(config),
                                  rope_base=config.rope_base, norm_eps=config.norm_eps,
                                  init_std=config.init_std, num_layers=config.layers)
    raise invalid("arch", repr(config.arch), "one of 'transformer', 'titans', 'titans-mag', "
                  "'hope', 'hope-attention'")
