"""Layers: Transformer++ parts, Titans memories, the Continuum Memory System and HOPE blocks.

Every layer runs ``forward(x [B, T, D], state=None) -> (y, state)`` so a stream can be cut
into segments; the memories' choices and stability bounds are in ``MEMORY_LAYERS.md`` and the
CMS in ``CMS.md``.
"""

from nestlearn.nn.cms import CMSConfig, CMSLevelState, ContinuumMemory, ContinuumMemoryState
from nestlearn.nn.conv import CausalDepthwiseConv
from nestlearn.nn.hope_attention import HOPEAttentionBlock, HOPEAttentionState
from nestlearn.nn.hope_block import HOPEBlock, HOPEBlockState
from nestlearn.nn.self_modifying import (
    SelfModifyingTitans,
    SelfModifyingTitansConfig,
    SelfModifyingTitansState,
)
from nestlearn.nn.teach_signal import stream_with_teach_signal
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from nestlearn.nn.transformer import (
    AttentionState,
    CausalSelfAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
)

__all__ = [
    "AttentionState",
    "CMSConfig",
    "CMSLevelState",
    "CausalDepthwiseConv",
    "CausalSelfAttention",
    "ContinuumMemory",
    "ContinuumMemoryState",
    "HOPEAttentionBlock",
    "HOPEAttentionState",
    "HOPEBlock",
    "HOPEBlockState",
    "NeuralMemory",
    "NeuralMemoryConfig",
    "NeuralMemoryState",
    "RMSNorm",
    "RotaryEmbedding",
    "SelfModifyingTitans",
    "SelfModifyingTitansConfig",
    "SelfModifyingTitansState",
    "SwiGLU",
    "TransformerBlock",
    "stream_with_teach_signal",
]
