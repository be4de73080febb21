"""The arch registry's entries: one builder function and one ``register_arch`` call per arch.

Every block maps ``(x [B, T, D], state) -> (y [B, T, D], state)`` with its residual
connections inside, so the LM is only embedding, blocks, final norm and head. To add an arch,
write a function ``ModelConfig -> nn.Module`` and register it with the sections it uses.
"""

from __future__ import annotations

from torch import nn

from nestlearn.models.blocks import GatedMemoryBlock, MemoryBlock
from nestlearn.models.config import ArchSpec, ModelConfig, register_arch
from nestlearn.nn.hope_attention import HOPEAttentionBlock
from nestlearn.nn.hope_block import HOPEBlock
from nestlearn.nn.self_modifying import SelfModifyingTitansConfig
from nestlearn.nn.titans import NeuralMemoryConfig
from nestlearn.nn.transformer import TransformerBlock


def transformer_block(config: ModelConfig) -> nn.Module:
    return TransformerBlock(config.dim, config.heads, config.mlp_width,
                            window=config.attention.window, rope_base=config.attention.rope_base,
                            norm_eps=config.norm_eps, init_std=config.init_std,
                            num_layers=config.layers)


def hope_block(config: ModelConfig) -> nn.Module:
    return HOPEBlock(config.memory, config.cms_layer_config(), config.norm_eps)


def hope_attention_block(config: ModelConfig) -> nn.Module:
    return HOPEAttentionBlock(config.dim, config.heads, config.cms_layer_config(),
                              rope_base=config.attention.rope_base, norm_eps=config.norm_eps,
                              init_std=config.init_std, num_layers=config.layers)


register_arch(ArchSpec(
    "transformer", transformer_block, "Transformer++: attention (global or sliding) + SwiGLU",
    attention="optional"))
register_arch(ArchSpec(
    "hope", hope_block, "HOPE: self-modifying Titans + CMS",
    memory=SelfModifyingTitansConfig, cms=True,
    # Models read out unit-norm values and run the inner memories at a shorter chunk than the
    # main memory (MEMORY_LAYERS.md, "Stability").
    memory_defaults={"inner_chunk_size": 16, "normalize_values": True}))
register_arch(ArchSpec(
    "hope-attention", hope_attention_block, "HOPE-attention: global softmax attention + CMS",
    attention="global", cms=True))
register_arch(ArchSpec(
    "titans", MemoryBlock, "Titans LMM: neural memory as a layer + SwiGLU",
    memory=NeuralMemoryConfig))
register_arch(ArchSpec(
    "titans-mag", GatedMemoryBlock,
    "Titans MAG: sliding-window attention gated by neural memory + SwiGLU",
    attention="windowed", memory=NeuralMemoryConfig))
