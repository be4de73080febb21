"""Which block each architecture stacks: ``make_block(config, index)``.

Every block maps ``(x [B, T, D], state) -> (y [B, T, D], state)`` with its residual
connections inside, so the LM is only embedding, blocks, final norm and head.
"""

from __future__ import annotations

from torch import nn

from nestlearn.errors import invalid
from nestlearn.models.config import ModelConfig
from nestlearn.nn.transformer import TransformerBlock


def make_transformer_block(config: ModelConfig) -> TransformerBlock:
    return TransformerBlock(config.dim, config.heads, config.mlp_hidden, window=config.window,
                            rope_base=config.rope_base, norm_eps=config.norm_eps,
                            init_std=config.init_std, num_layers=config.layers)


def make_block(config: ModelConfig, index: int) -> nn.Module:
    """The ``index``-th block of ``config.arch``."""
    if config.arch == "transformer":
        return make_transformer_block(config)
    raise invalid("arch", repr(config.arch), "an architecture whose layers are available: "
                  "'transformer'")
