"""Between nestlearn models and ``transformers`` models and folders.

A nestlearn model folder (``nestlearn.models.save_pretrained``: ``config.json`` with the
nestlearn config and checksum, ``model.safetensors``) and a Hugging Face folder
(``save_pretrained`` of a :class:`NestlearnForCausalLM`: ``config.json`` with ``model_type``
``nestlearn_<arch>``, ``model.safetensors`` with the same tensors under ``nestlearn.``,
``generation_config.json``, and the tokenizer when one is given) hold the same weights; the
functions here move a model between them without changing a value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nestlearn.data.tokenizers import ByteTokenizer, Tokenizer
from nestlearn.errors import invalid
from nestlearn.hf.modeling import NestlearnForCausalLM, hf_classes
from nestlearn.models import from_pretrained
from nestlearn.models.lm import CausalLM


def to_hf(model: CausalLM, tokenizer: Tokenizer | None = None) -> NestlearnForCausalLM:
    """``model`` as a ``transformers`` model: it wraps the same module (no copy), in its
    dtype and on its device. With ``tokenizer``, its end-of-document id is the EOS id (and
    ``generate`` stops there unless told otherwise) and its padding id the pad id."""
    if not isinstance(model, CausalLM):
        raise invalid("model", type(model).__name__, "a nestlearn CausalLM (build_model)")
    config_cls, model_cls = hf_classes(model.config.arch)
    token_ids: dict[str, Any] = {}
    if tokenizer is not None:
        token_ids = {"eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.pad_id}
    config = config_cls(nestlearn=model.config.to_dict(), **token_ids)
    parameter = next(model.parameters())
    config.dtype = parameter.dtype
    hf_model = model_cls(config)
    hf_model.nestlearn = model
    hf_model.generation_config.update(**token_ids)
    return hf_model.eval() if not model.training else hf_model


def from_hf(model: nn.Module) -> CausalLM:
    """The nestlearn model inside a :class:`NestlearnForCausalLM` (the same module)."""
    if not isinstance(model, NestlearnForCausalLM):
        raise invalid("model", type(model).__name__, "a NestlearnForCausalLM (nestlearn.hf)")
    return model.nestlearn


def save_hf_folder(model: CausalLM | str | os.PathLike[str], directory: str | os.PathLike[str],
                   tokenizer: Tokenizer | None = None) -> Path:
    """Write a Hugging Face folder of ``model`` (a nestlearn model, or the path of a nestlearn
    model folder) to ``directory``; ``AutoModelForCausalLM.from_pretrained(directory)`` loads
    it once ``nestlearn.hf`` is imported. A BPE or pretrained ``tokenizer`` is written as
    ``tokenizer.json`` + ``tokenizer_config.json`` (``AutoTokenizer`` loads them)."""
    if isinstance(model, (str, os.PathLike)):
        model = from_pretrained(model)
    if isinstance(tokenizer, ByteTokenizer):
        raise invalid("tokenizer", "ByteTokenizer",
                      "a BPE or pretrained tokenizer (transformers has no byte tokenizer)")
    hf_model = to_hf(model, tokenizer)
    target = Path(directory)
    hf_model.save_pretrained(target)
    if tokenizer is not None:
        _save_hf_tokenizer(tokenizer, target)
    return target


def load_hf_folder(directory: str | os.PathLike[str],
                   device: str | torch.device = "cpu") -> CausalLM:
    """The nestlearn model of a Hugging Face folder written by :func:`save_hf_folder` (in the
    saved dtype); ``nestlearn.models.save_pretrained`` turns it back into a nestlearn folder."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto")
    return from_hf(hf_model).to(device)


def _save_hf_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    import json

    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = HFTokenizer.from_str(json.dumps(tokenizer.to_json()))
    names = {token_id: hf_tokenizer.id_to_token(token_id)
             for token_id in (tokenizer.eod_id, tokenizer.pad_id)}
    fast = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer,
                                   eos_token=names[tokenizer.eod_id],
                                   pad_token=names[tokenizer.pad_id])
    fast.save_pretrained(str(directory))
