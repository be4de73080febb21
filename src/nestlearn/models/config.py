"""Model configurations: validated dataclasses that round-trip through JSON.

A wrong value fails at construction with a message naming the field, the value and what is
allowed (``nestlearn.errors.invalid``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from nestlearn.errors import NestlearnError, invalid

ARCHS: tuple[str, ...] = ("transformer", "hope", "hope-attention", "titans", "titans-mag")
POOLINGS: tuple[str, ...] = ("mean", "last")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, repr(value), "an int >= 1")


def _optional_positive_int(name: str, value: object) -> None:
    if value is not None:
        _positive_int(name, value)


def _positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise invalid(name, repr(value), "a number > 0")


def _bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise invalid(name, repr(value), "true or false")


def _from_dict(cls: type, data: object, where: str) -> dict[str, Any]:
    """Check ``data`` is a mapping whose keys are fields of ``cls``; return it as a dict."""
    if not isinstance(data, dict):
        raise invalid(where, type(data).__name__, "a JSON object")
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise invalid(f"{where} keys", unknown, f"fields of {cls.__name__}: {sorted(names)}")
    return dict(data)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal LM (``build_model``) and of the classifier backbones.

    Shared fields: ``vocab_size``, ``dim``, ``layers`` (blocks), ``heads`` (attention and
    memory heads), ``mlp_hidden`` (SwiGLU hidden size; default ``8 * dim / 3`` rounded up to a
    multiple of 8, the Transformer++ choice), ``tie_embeddings`` (head shares the embedding
    matrix), ``norm_eps``, ``rope_base``, ``init_std``.
    ``window``: sliding-window length of softmax attention (``transformer``, ``hope-attention``;
    required by ``titans-mag``, whose attention branch is local by design), or None for global.
    """

    arch: str = "transformer"
    vocab_size: int = 256
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_hidden: int | None = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    init_std: float = 0.02
    window: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise invalid("arch", repr(self.arch), f"one of {list(ARCHS)}")
        for name in ("vocab_size", "dim", "layers", "heads"):
            _positive_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise invalid("heads", self.heads, f"a divisor of dim={self.dim}")
        if (self.dim // self.heads) % 2:
            raise invalid("heads", self.heads,
                          f"a divisor of dim={self.dim} leaving an even head size (RoPE)")
        _optional_positive_int("mlp_hidden", self.mlp_hidden)
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", -(-8 * self.dim // 3 // 8) * 8)
        _bool("tie_embeddings", self.tie_embeddings)
        for name in ("norm_eps", "rope_base", "init_std"):
            _positive_float(name, getattr(self, name))
        if not self.rope_base > 1:
            raise invalid("rope_base", self.rope_base, "a number > 1")
        _optional_positive_int("window", self.window)
        if self.arch == "titans-mag" and self.window is None:
            raise invalid("window", None, "an int >= 1 for arch 'titans-mag' (sliding window)")
        if self.arch in ("hope", "titans") and self.window is not None:
            raise invalid("window", self.window, f"None for arch {self.arch!r} (no attention)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are refused (a typo must not pass silently)."""
        return cls(**_from_dict(cls, data, "model config"))

    def fingerprint(self) -> str:
        """Short hash of the configuration: tells states of different configs apart."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ClassifierConfig:
    """A sequence classifier: a ``ModelConfig`` backbone, ``num_classes`` and ``pooling``.

    ``pooling``: "mean" (average of the valid positions' final hidden states) or "last" (the
    last valid position, the natural read-out of a causal or recurrent model).
    """

    backbone: ModelConfig
    num_classes: int
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            object.__setattr__(self, "backbone", ModelConfig.from_dict(self.backbone))
        if not isinstance(self.backbone, ModelConfig):
            raise invalid("backbone", type(self.backbone).__name__, "a ModelConfig")
        _positive_int("num_classes", self.num_classes)
        if self.num_classes < 2:
            raise invalid("num_classes", self.num_classes, "an int >= 2")
        if self.pooling not in POOLINGS:
            raise invalid("pooling", repr(self.pooling), f"one of {list(POOLINGS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.to_dict(), "num_classes": self.num_classes,
                "pooling": self.pooling}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        return cls(**_from_dict(cls, data, "classifier config"))

    def fingerprint(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_from_dict(kind: str, data: dict[str, Any]) -> ModelConfig | ClassifierConfig:
    """Rebuild a saved config of ``kind`` ("causal_lm" or "classifier")."""
    if kind == "causal_lm":
        return ModelConfig.from_dict(data)
    if kind == "classifier":
        return ClassifierConfig.from_dict(data)
    raise NestlearnError(f"model kind: got {kind!r}; allowed: 'causal_lm' or 'classifier'")
