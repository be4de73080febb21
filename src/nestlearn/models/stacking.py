"""Ad-hoc level stacking (docs/paper.md section 3; arXiv 2512.24695 section 7.3).

A trained Transformer++ becomes a HOPE-attention model whose CMS levels start from the
Transformer's MLPs: attention, norms, embedding and head are copied; in each block the
SwiGLU MLP (with its pre-norm) goes into one CMS level and every other level starts with a
zero output matrix, so it adds nothing until it learns. Each CMS level is a pre-norm residual
MLP, exactly the MLP half of a Transformer++ block, so with the CMS inner learning rates at 0
the new model computes exactly the Transformer's logits; training then continues from there.

The MLP goes by default into the slowest level: the pretrained MLP never changed after
training (frequency 0 in the paper's terms), the closest to the least frequently updated
level; the faster levels are new capacity for in-context change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from nestlearn.errors import invalid
from nestlearn.models.build import build_model
from nestlearn.models.lm import CausalLM
from nestlearn.nn.cms import CMSConfig
from nestlearn.nn.transformer import TransformerBlock

STACK_ARCHS: tuple[str, ...] = ("hope-attention", "hope")


def _check_source(model: object, arch: str) -> CausalLM:
    if not isinstance(model, CausalLM) or model.config.arch != "transformer":
        got = model.config.arch if isinstance(model, CausalLM) else type(model).__name__
        raise invalid("transformer_model", repr(got), "a CausalLM with arch 'transformer'")
    if arch not in STACK_ARCHS:
        raise invalid("arch", repr(arch), f"one of {list(STACK_ARCHS)}")
    if arch == "hope-attention" and model.config.attention.window is not None:
        raise invalid("transformer_model.config.attention.window", model.config.attention.window,
                      "None (HOPE-attention uses global attention)")
    return model


def hope_from_transformer(transformer_model: CausalLM, *, arch: str = "hope-attention",
                          cms_chunk_sizes: tuple[int, ...] | None = None,
                          mlp_level: int | None = None,
                          cms_inner_lr: float | tuple[float, ...] = 0.0,
                          **config_overrides: Any) -> CausalLM:
    """A HOPE-attention (or HOPE) model whose CMS levels start from ``transformer_model``'s MLPs.

    ``cms_chunk_sizes``: the new CMS levels (default: the source config's); ``mlp_level``:
    the level (0 = fastest) that receives each block's MLP (default: the slowest);
    ``cms_inner_lr``: the CMS inner learning rates (0 = the Transformer exactly, for
    ``arch="hope-attention"``); other ``ModelConfig`` fields may be overridden, and a ``cms``
    dict sets further CMS fields (e.g. ``cms={"variant": "independent"}``).
    With ``arch="hope"`` the attention is replaced by a fresh self-modifying Titans mixer, so
    only the embedding, head, final norm and MLPs carry over and the logits are not equal.
    """
    source = _check_source(transformer_model, arch)
    base = source.config
    chunks = CMSConfig(base.dim).chunk_sizes if cms_chunk_sizes is None else cms_chunk_sizes
    levels = len(chunks) if isinstance(chunks, (list, tuple)) else 1
    level = levels - 1 if mlp_level is None else mlp_level
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < levels:
        raise invalid("mlp_level", repr(mlp_level), f"None or an int in [0, {levels - 1}]")
    cms = {"chunk_sizes": chunks, "hidden": base.mlp_width, "mlp": "swiglu",
           "inner_lr": cms_inner_lr}
    fields: dict[str, Any] = {"arch": arch, "mlp_hidden": base.mlp_width, "cms": cms,
                              "attention": base.attention if arch == "hope-attention" else None}
    overrides = dict(config_overrides)
    if isinstance(overrides.get("cms"), dict):
        fields["cms"] = {**cms, **overrides.pop("cms")}
    fields.update(overrides)
    config = dataclasses.replace(base, **fields)
    if (config.cms.mlp != "swiglu" or config.cms_layer_config().level_hidden != (base.mlp_width,)
            * levels or config.dim != base.dim):
        raise invalid("config_overrides", {k: config_overrides[k] for k in config_overrides},
                      "no change to cms.mlp, cms.hidden or dim (the MLPs must fit the levels)")
    if config.cms.variant == "nested" and levels > 1:
        raise invalid("cms.variant", "'nested'", "'sequential' or 'independent' for stacking "
                      "(nested levels all start from one set of weights)")
    reference = next(source.parameters())
    model = build_model(config).to(dtype=reference.dtype, device=reference.device)
    with torch.no_grad():
        model.backbone.embed.weight.copy_(source.backbone.embed.weight)
        model.backbone.norm.weight.copy_(source.backbone.norm.weight)
        if model.head is not None:
            model.head.weight.copy_(source.head.weight)
        for new_block, old_block in zip(model.backbone.blocks, source.backbone.blocks,
                                        strict=True):
            _stack_block(new_block, old_block, level)
    return model


def _stack_block(new_block: torch.nn.Module, old_block: TransformerBlock, level: int) -> None:
    if hasattr(new_block, "load_from_transformer_block"):
        new_block.load_from_transformer_block(old_block, level=level)
    else:
        # HOPE: the mixer's pre-norm takes the attention's gain; the MLP goes into the CMS.
        new_block.norm.weight.copy_(old_block.attn_norm.weight)
        mlp = old_block.mlp
        new_block.cms.load_level_from_swiglu(level, mlp.gate.weight, mlp.up.weight,
                                             mlp.down.weight, old_block.mlp_norm.weight)
    cms = new_block.cms
    for index, owner in enumerate(cms.initial):
        if index != level:
            owner.w_down.zero_()
    if hasattr(cms, "mix"):
        cms.mix.copy_(torch.nn.functional.one_hot(torch.tensor(level), len(cms.mix)))
