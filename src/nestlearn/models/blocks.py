"""The Titans blocks: LMM (memory as a layer) and MAG (memory as a gate).

Every block maps ``(x [B, T, D], state) -> (y [B, T, D], state)`` with its residual
connections inside, so the LM is only embedding, blocks, final norm and head;
``nestlearn.models.archs`` says which block each arch stacks.
"""

from __future__ import annotations

import torch
from torch import nn

from nestlearn.errors import invalid
from nestlearn.models.config import ModelConfig
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryState
from nestlearn.nn.transformer import AttentionState, CausalSelfAttention, RMSNorm, SwiGLU
from nestlearn.state import TreeState, state_dataclass


class MemoryBlock(nn.Module):
    """Titans LMM block: ``x + memory(norm(x))`` then ``x + swiglu(norm(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.memory_norm = RMSNorm(config.dim, config.norm_eps)
        self.memory = NeuralMemory(config.memory)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.mlp_width, config.init_std, config.out_init_std)

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
        self.attn = CausalSelfAttention(dim, config.heads, config.attention.window,
                                        config.attention.rope_base, config.init_std)
        self.memory = NeuralMemory(config.memory)
        self.attn_out_norm = RMSNorm(dim, config.norm_eps)
        self.memory_out_norm = RMSNorm(dim, config.norm_eps)
        self.out = nn.Linear(dim, dim, bias=False)
        nn.init.normal_(self.out.weight, std=config.out_init_std)
        self.mlp_norm = RMSNorm(dim, config.norm_eps)
        self.mlp = SwiGLU(dim, config.mlp_width, config.init_std, config.out_init_std)

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
