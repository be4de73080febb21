"""Level stacking from Hugging Face models (docs/paper.md section 3; arXiv 2512.24695 7.3).

The paper turns pretrained Llama models into HOPE models whose CMS levels start from the
Llama MLPs. Here a ``transformers`` Llama (``LlamaForCausalLM``) is first copied exactly into
a nestlearn Transformer++ (same RMSNorm, "rotate half" RoPE, SwiGLU MLP, no biases), which
``nestlearn.models.stacking.hope_from_transformer`` then stacks into HOPE-attention levels.

Grouped-query attention is represented exactly: each key/value head's projection is repeated
for the query heads that share it (what Llama's ``repeat_kv`` does at run time); after
conversion the copies train independently. Anything else that nestlearn's blocks cannot
compute exactly (biases, another activation, RoPE scaling, a head size other than
``hidden_size / num_attention_heads``) is refused with one line naming the config field.

GPT-2 is refused: its blocks use LayerNorm with a bias (mean subtraction), MLPs with biases
and the tanh GELU, and learned absolute positions instead of RoPE; none of these has an exact
counterpart in a nestlearn block or CMS level (the levels are bias-free RMSNorm MLPs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nestlearn.errors import NestlearnError, invalid
from nestlearn.models.build import build_model
from nestlearn.models.config import ModelConfig
from nestlearn.models.lm import CausalLM
from nestlearn.models.stacking import STACK_ARCHS, hope_from_transformer

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama",)

GPT2_REFUSAL = ("hf_model: GPT-2 cannot be stacked exactly (LayerNorm with bias, MLPs with "
                "biases and tanh GELU, learned positions have no nestlearn counterpart); "
                "allowed: a Llama-architecture model (LlamaForCausalLM)")


def _llama_config(hf_model: object) -> Any:
    config = getattr(hf_model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "gpt2":
        raise NestlearnError(GPT2_REFUSAL)
    if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(hf_model, "lm_head"):
        got = model_type if model_type is not None else type(hf_model).__name__
        raise invalid("hf_model", repr(got), "a Llama-architecture LlamaForCausalLM")
    return config


def _check_exact(config: Any) -> None:
    """Refuse every Llama option whose computation a nestlearn Transformer++ does not match."""
    exact = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
             "pretraining_tp": 1}
    for name, wanted in exact.items():
        value = getattr(config, name, wanted)
        if value != wanted:
            raise invalid(f"hf_model.config.{name}", repr(value), repr(wanted))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size:
        raise invalid("hf_model.config.head_dim", head_dim,
                      f"hidden_size / num_attention_heads = {config.hidden_size / heads}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise invalid("hf_model.config.rope_parameters.rope_type", repr(rope["rope_type"]),
                      "'default' (RoPE scaling has no nestlearn counterpart)")


def llama_model_config(hf_config: Any) -> ModelConfig:
    """The nestlearn Transformer++ config that computes what ``hf_config``'s Llama computes."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return ModelConfig(arch="transformer", vocab_size=hf_config.vocab_size,
                       dim=hf_config.hidden_size, layers=hf_config.num_hidden_layers,
                       heads=hf_config.num_attention_heads,
                       mlp_hidden=hf_config.intermediate_size,
                       tie_embeddings=bool(hf_config.tie_word_embeddings),
                       norm_eps=hf_config.rms_norm_eps,
                       init_std=hf_config.initializer_range,
                       attention={"rope_base": float(rope.get("rope_theta", 10000.0))})


def _repeat_heads(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """``[kv_heads * head_dim, D]`` -> ``[heads * head_dim, D]``, each KV head repeated for
    its group of query heads (the row order of Llama's ``repeat_kv``)."""
    kv_heads = weight.shape[0] // head_dim
    grouped = weight.view(kv_heads, 1, head_dim, -1).expand(kv_heads, heads // kv_heads,
                                                            head_dim, weight.shape[1])
    return grouped.reshape(heads * head_dim, weight.shape[1])


def transformer_from_llama(hf_model: Any) -> CausalLM:
    """A nestlearn Transformer++ ``CausalLM`` with ``hf_model``'s (a ``LlamaForCausalLM``)
    weights, in its dtype and on its device, computing the same logits."""
    config = _llama_config(hf_model)
    _check_exact(config)
    model_config = llama_model_config(config)
    source = hf_model.model
    reference = source.embed_tokens.weight
    model = build_model(model_config).to(dtype=reference.dtype, device=reference.device)
    heads, head_dim = model_config.heads, model_config.dim // model_config.heads
    with torch.no_grad():
        model.backbone.embed.weight.copy_(source.embed_tokens.weight)
        model.backbone.norm.weight.copy_(source.norm.weight)
        if model.head is not None:
            model.head.weight.copy_(hf_model.lm_head.weight)
        for block, layer in zip(model.backbone.blocks, source.layers, strict=True):
            attn = layer.self_attn
            block.attn_norm.weight.copy_(layer.input_layernorm.weight)
            block.attn.qkv.weight.copy_(torch.cat([
                attn.q_proj.weight, _repeat_heads(attn.k_proj.weight, heads, head_dim),
                _repeat_heads(attn.v_proj.weight, heads, head_dim)]))
            block.attn.out.weight.copy_(attn.o_proj.weight)
            block.mlp_norm.weight.copy_(layer.post_attention_layernorm.weight)
            block.mlp.gate.weight.copy_(layer.mlp.gate_proj.weight)
            block.mlp.up.weight.copy_(layer.mlp.up_proj.weight)
            block.mlp.down.weight.copy_(layer.mlp.down_proj.weight)
    return model


def stack_levels_from_hf(hf_model: Any, *, arch: str = "hope-attention",
                         **stacking_options: Any) -> CausalLM:
    """A HOPE-attention (or HOPE) model whose CMS levels start from ``hf_model``'s MLPs.

    ``hf_model``: a ``LlamaForCausalLM`` (GPT-2 and other families are refused: see the
    module docstring). ``stacking_options`` are ``hope_from_transformer``'s
    (``cms_chunk_sizes``, ``mlp_level``, ``cms_inner_lr``, ``cms={...}``, ``ModelConfig``
    overrides). With ``arch="hope-attention"`` and the CMS inner learning rates at 0 (the
    default) the result computes the Llama model's logits.
    """
    if arch not in STACK_ARCHS:
        raise invalid("arch", repr(arch), f"one of {list(STACK_ARCHS)}")
    return hope_from_transformer(transformer_from_llama(hf_model), arch=arch,
                                 **stacking_options)


def stack_hf_folder(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                    arch: str = "hope-attention", **stacking_options: Any) -> Path:
    """Read a Llama folder written by ``save_pretrained`` (in its saved dtype), stack its MLPs
    into CMS levels (:func:`stack_levels_from_hf`) and write the result as a Hugging Face
    folder (``nestlearn.hf.load_hf_folder`` and ``AutoModelForCausalLM`` read it), with the
    source's tokenizer when the folder has one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nestlearn.hf.convert import save_hf_folder

    source_dir = Path(source)
    if not (source_dir / "config.json").is_file():
        raise invalid("from_hf", str(source_dir), "a folder with config.json written by "
                      "save_pretrained")
    hf_model = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype="auto")
    model = stack_levels_from_hf(hf_model, arch=arch, **stacking_options)
    target = save_hf_folder(model, out)
    if (source_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(source_dir)).save_pretrained(str(target))
    return target
