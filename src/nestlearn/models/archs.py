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

# The models' memories start with the gates near their caps, forget little and run at chunk 16,
# chosen with `nestlearn bench recall --layer-archs` (MEMORY_LAYERS.md, "Defaults, measured"):
# recall error after 16 repetitions of 128 random inputs (2 = nothing stored) falls from 1.86
# to 0.97 (titans) and from 1.89 to 1.10 (hope). The caps, which carry the stability bound,
# are unchanged.
MEMORY_GATE_DEFAULTS = {"chunk_size": 16, "eta_init": 0.9, "theta_init": 0.8,
                        "forget_init": 1e-5}

# The `paper` preset of HOPE's self-modifying memory: the equations of docs/paper.md section 5
# taken literally wherever they are explicit (each difference from the defaults is listed in
# MEMORY_LAYERS.md, "The paper preset"). Recipe `tiny-hope-paper`, or any hope config with
# `memory=PAPER_HOPE_MEMORY`.
PAPER_HOPE_MEMORY = {
    "memory_target": "self",        # Eq. 83/88: every memory, the main one too, regresses M(v)
    "readout": "chunk_start",       # Eq. 90: o_t from the memory at the start of t's chunk
    "momentum": False,              # (5.3): a DGD step with weight decay, no momentum
    "dgd": True,
    "weight_decay": True,
    "input_projection": False,      # (5.1): k_t = M_k(x_t), the memories read x itself
    "normalize_inputs": False,      # only q and k are L2-normalized
    "normalize_values": False,      # v_t = M_v(x_t), raw
    "adaptive_q": False,            # q is "the only non-adaptive projection"
    "output_gate": False,           # (5.5): y = CMS(o), no output gate
}


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
    # Models read out unit-norm values and pin the inner memories' chunk at 16, which stays 16
    # when memory.chunk_size is overridden (MEMORY_LAYERS.md, "Stability").
    memory_defaults={**MEMORY_GATE_DEFAULTS, "inner_chunk_size": 16,
                     "normalize_values": True}))
register_arch(ArchSpec(
    "hope-attention", hope_attention_block, "HOPE-attention: global softmax attention + CMS",
    attention="global", cms=True))
register_arch(ArchSpec(
    "titans", MemoryBlock, "Titans LMM: neural memory as a layer + SwiGLU",
    memory=NeuralMemoryConfig, memory_defaults=MEMORY_GATE_DEFAULTS))
register_arch(ArchSpec(
    "titans-mag", GatedMemoryBlock,
    "Titans MAG: sliding-window attention gated by neural memory + SwiGLU",
    attention="windowed", memory=NeuralMemoryConfig, memory_defaults=MEMORY_GATE_DEFAULTS))
