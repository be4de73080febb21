"""The HOPE-Attention block (docs/paper.md section 5).

``HOPEAttentionBlock``: the HOPE-Attention variant, global causal softmax attention (RoPE,
pre-norm, KV cache) followed by a Continuum Memory System:
``h = x + attn(norm(x))``, ``y = CMS(h)``; each CMS level carries its own pre-norm and residual,
so with a one-level frozen CMS holding a Transformer++ MLP the block is exactly a Transformer++
block (ad-hoc level stacking, docs/paper.md section 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nestlearn.errors import check_int, invalid
from nestlearn.nn.cms import CMSConfig, ContinuumMemory, ContinuumMemoryState, TeachHook
from nestlearn.nn.transformer import AttentionState, CausalSelfAttention, RMSNorm, check_input
from nestlearn.state import TreeState, state_dataclass


@state_dataclass
class HOPEAttentionState(TreeState):
    """State of a ``HOPEAttentionBlock``: the attention's KV cache and the CMS state."""

    attention: AttentionState
    cms: ContinuumMemoryState


class HOPEAttentionBlock(nn.Module):
    """Softmax attention + CMS: ``forward(x [B, T, D], state=None) -> (y, state)``.

    ``cms.dim`` must equal ``dim``. ``window`` (optional) makes the attention a sliding window
    (the paper's HOPE-Attention is global: None). ``init_std`` and ``num_layers`` set the
    attention's initial weights as in ``TransformerBlock`` (output projection std
    ``init_std / sqrt(2 * num_layers)``); the CMS levels follow their own config.
    """

    def __init__(self, dim: int, heads: int, cms: CMSConfig, window: int | None = None,
                 rope_base: float = 10000.0, norm_eps: float = 1e-6, init_std: float = 0.02,
                 num_layers: int = 1) -> None:
        super().__init__()
        if not isinstance(cms, CMSConfig):
            raise invalid("cms", type(cms).__name__, "a CMSConfig")
        if cms.dim != dim:
            raise invalid("cms.dim", cms.dim, f"the block's dim ({dim})")
        check_int("num_layers", num_layers)
        self.dim = dim
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = CausalSelfAttention(dim, heads, window, rope_base, init_std,
                                        init_std / math.sqrt(2 * num_layers))
        self.cms = ContinuumMemory(cms)

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> HOPEAttentionState:
        """Empty KV cache and CMS levels at their meta-learned weights, position 0."""
        return HOPEAttentionState(self.attn.init_state(batch, device=device, dtype=dtype),
                                  self.cms.init_state(batch, device=device, dtype=dtype))

    def load_from_transformer_block(self, block: nn.Module, level: int = 0) -> None:
        """Copy a trained ``TransformerBlock`` into this block: attention and its norm, and
        the SwiGLU MLP with its norm into CMS level ``level`` (ad-hoc level stacking)."""
        with torch.no_grad():
            self.attn_norm.load_state_dict(block.attn_norm.state_dict())
            self.attn.load_state_dict(block.attn.state_dict())
        mlp = block.mlp
        self.cms.load_level_from_swiglu(level, mlp.gate.weight, mlp.up.weight, mlp.down.weight,
                                        block.mlp_norm.weight)

    def forward(self, x: torch.Tensor, state: HOPEAttentionState | None = None, *,
                teach_hook: TeachHook | None = None) -> tuple[torch.Tensor, HOPEAttentionState]:
        """``teach_hook``: the LM teach-signal driver's hook, handed to the CMS."""
        if state is not None and not isinstance(state, HOPEAttentionState):
            raise invalid("state", type(state).__name__, "a HOPEAttentionState or None")
        check_input(x, self.dim, self.attn_norm.weight.dtype)
        mixed, attention = self.attn(self.attn_norm(x), None if state is None else state.attention)
        y, cms = self.cms(x + mixed, None if state is None else state.cms, teach_hook=teach_hook)
        return y, HOPEAttentionState(attention, cms)
