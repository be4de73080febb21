"""``NestlearnConfig``: a ``transformers`` config holding a nestlearn ``ModelConfig``.

The nestlearn config is stored whole under ``nestlearn`` (``ModelConfig.to_dict()``), the one
source of truth; ``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads`` and ``tie_word_embeddings`` repeat its fields for tools that read them
and are overwritten from it. Each arch has its own subclass (``model_type``
``nestlearn_<arch>``, :func:`nestlearn.hf.modeling.hf_classes`), so ``AutoConfig`` and
``AutoModelForCausalLM`` pick the right classes from a folder's ``config.json``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PretrainedConfig

from nestlearn.errors import NestlearnError, invalid
from nestlearn.models.config import ARCHS, ModelConfig

DEFAULT_WINDOW = 128


def model_type_of(arch: str) -> str:
    return "nestlearn_" + arch.replace("-", "_")


def default_model_config(arch: str) -> ModelConfig:
    """``ModelConfig``'s defaults for ``arch``; a windowed arch (titans-mag) gets a window of
    ``DEFAULT_WINDOW`` since it has no default of its own."""
    attention = {"window": DEFAULT_WINDOW} if ARCHS[arch].attention == "windowed" else None
    return ModelConfig(arch=arch, attention=attention)


class NestlearnConfig(PretrainedConfig):
    """Base of the per-arch configs; ``arch`` is the class's nestlearn arch."""

    model_type = "nestlearn"
    arch: ClassVar[str | None] = None

    nestlearn: dict | None = None
    vocab_size: int = 256
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        if self.nestlearn is None:  # transformers builds default configs to diff against
            self.nestlearn = default_model_config(self.arch or "transformer").to_dict()
        model_config = self.model_config()
        self.vocab_size = model_config.vocab_size
        self.hidden_size = model_config.dim
        self.num_hidden_layers = model_config.layers
        self.num_attention_heads = model_config.heads
        self.tie_word_embeddings = model_config.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The nestlearn ``ModelConfig`` (validated; a wrong field names itself)."""
        if not isinstance(self.nestlearn, dict):
            raise invalid("nestlearn", type(self.nestlearn).__name__,
                          "a dict (ModelConfig.to_dict())")
        config = ModelConfig.from_dict(self.nestlearn)
        if self.arch is not None and config.arch != self.arch:
            raise NestlearnError(f"{type(self).__name__}: nestlearn config has arch "
                                 f"{config.arch!r}; allowed: {self.arch!r}")
        return config
