"""``NestlearnForCausalLM``: a nestlearn ``CausalLM`` as a ``transformers`` model.

The wrapped model is ``self.nestlearn`` (its parameters are named ``nestlearn.<name>``), built by
``nestlearn.models.build_model`` and initialized by it; ``forward`` is one call of it, with the
state carried in a :class:`~nestlearn.hf.cache.NestlearnCache`. ``generate`` therefore reads the
prompt in one pass and then feeds one token at a time with the state, exactly as
``nestlearn.models.generate`` does, so greedy decoding gives the same tokens; sampling, top-k,
top-p, EOS, streamers and stopping criteria are ``transformers``' own.

Padding inside a batch is refused (an ``attention_mask`` with zeros): a recurrent state cannot
skip the padded positions the way attention masks them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nestlearn.errors import NestlearnError, invalid
from nestlearn.hf.cache import NestlearnCache
from nestlearn.hf.config import NestlearnConfig, model_type_of
from nestlearn.losses import lm_loss_sum, scored_targets
from nestlearn.models import ARCHS, build_model
from nestlearn.models.lm import CausalLM

# Keyword arguments transformers may pass that do not change what the model computes here
# (positions come from the state; attentions and per-layer hidden states are not returned).
_IGNORED_WHEN_UNSET = ("output_attentions", "output_hidden_states", "position_ids")


def _check_mask(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise NestlearnError(
            "attention_mask: got zeros (padding); allowed: all ones. nestlearn models carry a "
            "state through every position, so batch prompts of equal length (or one by one)")


class NestlearnForCausalLM(PreTrainedModel, GenerationMixin):
    """A nestlearn causal LM as a ``transformers`` ``PreTrainedModel`` with ``generate``."""

    config_class = NestlearnConfig
    base_model_prefix = "nestlearn"
    main_input_name = "input_ids"
    # a state that cannot be rolled back: no assisted decoding
    _is_stateful = True

    def __init__(self, config: NestlearnConfig) -> None:
        super().__init__(config)
        # transformers loads a checkpoint in its dtype by making it the default dtype while
        # the model is built; the deep memories' initial weights are made in float32
        # explicitly, so they follow the default dtype here.
        self.nestlearn: CausalLM = build_model(config.model_config()).to(
            torch.get_default_dtype())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Keep nestlearn's own initialization (each layer's constructor sets it)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward pass creates a NestlearnCache

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.nestlearn.backbone.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.nestlearn.backbone.embed = value

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.nestlearn.head  # None: tied to the input embedding inside nestlearn

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      cache: NestlearnCache | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      use_cache: bool | None = None, **kwargs: Any
                                      ) -> dict[str, Any]:
        """The tokens the state has not read yet (all of them on the first step)."""
        _check_mask(attention_mask)
        seen = cache.seen_tokens if cache is not None else 0
        if seen >= input_ids.shape[1]:
            raise invalid("input_ids", f"{input_ids.shape[1]} tokens",
                          f"more than the {seen} tokens the cache has already read")
        return {"input_ids": input_ids[:, seen:], "cache": cache, "use_cache": use_cache}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: NestlearnCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """``input_ids [B, T]`` continue the stream in ``cache`` (a new one if None).

        ``labels [B, T]``: the mean next-token loss over positions 0..T-2 predicting labels
        1..T-1 (``-100`` not scored), as transformers' causal LMs compute it.
        """
        unsupported = [key for key, value in kwargs.items()
                       if value is not None and value is not False
                       and key not in _IGNORED_WHEN_UNSET]
        if unsupported:
            raise invalid("forward", f"arguments {sorted(unsupported)}",
                          "input_ids, attention_mask, cache, labels, use_cache, return_dict")
        _check_mask(attention_mask)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = cache.state if cache is not None else None
        logits, new_state = self.nestlearn(input_ids, state)
        if use_cache:
            cache = cache if cache is not None else NestlearnCache()
            cache.update(new_state)
        else:
            cache = None
        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)
            loss = lm_loss_sum(logits[:, :-1], targets) / scored_targets(targets)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)
        return output if return_dict is not False else output.to_tuple()


_CLASSES: dict[str, tuple[type[NestlearnConfig], type[NestlearnForCausalLM]]] = {}


def _class_stem(arch: str) -> str:
    return "Nestlearn" + "".join(part.capitalize() for part in arch.replace("_", "-").split("-"))


def hf_classes(arch: str) -> tuple[type[NestlearnConfig], type[NestlearnForCausalLM]]:
    """The config and model classes of ``arch`` (e.g. ``NestlearnHopeConfig``,
    ``NestlearnHopeForCausalLM``, model type ``nestlearn_hope``), made once."""
    if arch not in ARCHS:
        raise invalid("arch", repr(arch), "one of " + ", ".join(repr(a) for a in ARCHS))
    if arch not in _CLASSES:
        stem = _class_stem(arch)
        config_cls = type(f"{stem}Config", (NestlearnConfig,),
                          {"model_type": model_type_of(arch), "arch": arch,
                           "__module__": __name__})
        model_cls = type(f"{stem}ForCausalLM", (NestlearnForCausalLM,),
                         {"config_class": config_cls, "__module__": __name__})
        _CLASSES[arch] = (config_cls, model_cls)
    return _CLASSES[arch]


def register_auto_classes() -> None:
    """Register every arch's classes with ``AutoConfig`` and ``AutoModelForCausalLM`` (archs
    registered later: call again)."""
    for arch in ARCHS:
        config_cls, model_cls = hf_classes(arch)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
