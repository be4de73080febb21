"""Model configurations: validated dataclasses that round-trip through JSON.

A wrong value fails at construction with a message naming the field, the value and what is
allowed (``nestlearn.errors.invalid``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from nestlearn.errors import NestlearnError, check_fraction, check_int, check_positive, invalid
from nestlearn.errors import check_bool as _bool
from nestlearn.errors import check_choice as _choice
from nestlearn.errors import check_optional_int as _optional_positive_int

ARCHS: tuple[str, ...] = ("transformer", "hope", "hope-attention", "titans", "titans-mag")
POOLINGS: tuple[str, ...] = ("mean", "last")
CMS_MLPS: tuple[str, ...] = ("swiglu", "gelu")
CMS_VARIANTS: tuple[str, ...] = ("sequential", "nested", "independent")
CMS_TEACH_SIGNALS: tuple[str, ...] = ("local", "lm")
# ModelConfig fields that change memory use and speed but not what the model computes.
MEMORY_ONLY_FIELDS: tuple[str, ...] = ("checkpoint_segment",)


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    """A non-empty, strictly increasing sequence of ints >= 1 (JSON lists become tuples)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value:
        raise invalid(name, repr(value), "a non-empty list of ints >= 1")
    for item in value:
        check_int(name, item)
    if any(a >= b for a, b in itertools.pairwise(value)):
        raise invalid(name, repr(value), "strictly increasing ints (fastest level first)")
    return tuple(value)


def _rates(name: str, value: object, levels: int) -> float | tuple[float, ...]:
    """One rate >= 0 for every level, or one per level."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)) \
                or not math.isfinite(item) or item < 0:
            raise invalid(name, repr(value), "finite numbers >= 0 (one, or one per level)")
    if isinstance(value, (list, tuple)):
        if len(items) != levels:
            raise invalid(name, repr(value), f"one number or {levels} (one per CMS level)")
        return tuple(float(item) for item in items)
    return float(value)


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
    ``window``: sliding-window length of softmax attention (``transformer``; required by
    ``titans-mag``, whose attention branch is local by design), or None for global attention
    (the only choice of ``hope-attention``).

    Memory fields (``titans``, ``titans-mag``: ``NeuralMemory``; ``hope``: self-modifying
    Titans): ``memory_depth`` and ``memory_expansion`` (layers and hidden multiple of each
    memory MLP), ``chunk_size`` (tokens whose inner gradients share the chunk-start state),
    ``memory_momentum``, ``memory_weight_decay``, ``memory_dgd`` (delta gradient descent; None =
    on for ``hope``, as in the paper, off for Titans), ``memory_eta_max`` (upper end of the
    inner learning rate eta_t; None derives it from ``memory_chunk_step``, the chunk sizes, the
    memory width and ``memory_theta_max`` so that a whole chunk's step stays bounded, see
    ``nestlearn/nn/MEMORY_LAYERS.md``), ``memory_chunk_step`` (that bound), ``memory_theta_max``
    (soft cap of the momentum gate), ``memory_normalize_values`` (unit-norm Titans values),
    ``memory_eta_init``, ``memory_theta_init``, ``memory_forget_init`` (the gates at
    initialization: eta_t / eta_max, theta_t, 1 - alpha_t), ``persistent_tokens`` (Titans: learnable
    tokens the memory reads once at the start of a stream), ``inner_chunk_size`` (``hope``: the
    chunk of the k, v, eta, alpha memories).

    CMS fields (``hope``, ``hope-attention``): ``cms_chunk_sizes`` (C^(1) < ... < C^(k)),
    ``cms_hidden`` (hidden width of each level; default ``mlp_hidden``), ``cms_mlp`` ("swiglu",
    the Transformer++ MLP, so a trained Transformer can be stacked in; or "gelu"),
    ``cms_variant``, ``cms_teach_signal``, ``cms_inner_lr`` (one rate or one per level),
    ``cms_frozen`` (a plain MLP chain).

    ``checkpoint_segment``: activation checkpointing over the sequence (None = off). With
    gradients enabled, the backbone runs the sequence in segments of this many tokens, each
    block on each segment under ``torch.utils.checkpoint`` with the block's state carried from
    segment to segment: only the blocks' inputs and states at segment boundaries are kept, and
    one block-segment's activations are recomputed at a time in backward. Logits, final state
    and gradients are those of one pass (each block streams exactly); it changes memory and
    time only, so it is left out of ``fingerprint`` and does nothing without gradients.
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
    memory_depth: int = 2
    memory_expansion: int = 4
    chunk_size: int = 64
    memory_momentum: bool = True
    memory_weight_decay: bool = True
    memory_dgd: bool | None = None
    memory_eta_max: float | None = None
    memory_chunk_step: float = 1.0
    memory_theta_max: float = 0.9
    memory_normalize_values: bool = True
    memory_eta_init: float = 0.5
    memory_theta_init: float = 0.5
    memory_forget_init: float = 0.0001
    persistent_tokens: int = 0
    inner_chunk_size: int = 16
    cms_chunk_sizes: tuple[int, ...] = (16, 64)
    cms_hidden: int | None = None
    cms_mlp: str = "swiglu"
    cms_variant: str = "sequential"
    cms_teach_signal: str = "local"
    cms_inner_lr: float | tuple[float, ...] = 1e-3
    cms_frozen: bool = False
    checkpoint_segment: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise invalid("arch", repr(self.arch), f"one of {list(ARCHS)}")
        for name in ("vocab_size", "dim", "layers", "heads"):
            check_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise invalid("heads", self.heads, f"a divisor of dim={self.dim}")
        if (self.dim // self.heads) % 2:
            raise invalid("heads", self.heads,
                          f"a divisor of dim={self.dim} leaving an even head size (RoPE)")
        _optional_positive_int("mlp_hidden", self.mlp_hidden)
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", -(-8 * self.dim // 3 // 8) * 8)
        _bool("tie_embeddings", self.tie_embeddings)
        for name in ("norm_eps", "rope_base", "init_std", "memory_chunk_step"):
            check_positive(name, getattr(self, name))
        if self.memory_eta_max is not None:
            check_positive("memory_eta_max", self.memory_eta_max)
        for name in ("memory_theta_max", "memory_eta_init", "memory_theta_init",
                     "memory_forget_init"):
            check_fraction(name, getattr(self, name))
        if not self.memory_theta_init < self.memory_theta_max:
            raise invalid("memory_theta_init", self.memory_theta_init,
                          f"a number below memory_theta_max={self.memory_theta_max}")
        if not self.rope_base > 1:
            raise invalid("rope_base", self.rope_base, "a number > 1")
        _optional_positive_int("window", self.window)
        if self.arch == "titans-mag" and self.window is None:
            raise invalid("window", None, "an int >= 1 for arch 'titans-mag' (sliding window)")
        if self.arch in ("hope", "titans") and self.window is not None:
            raise invalid("window", self.window, f"None for arch {self.arch!r} (no attention)")
        if self.arch == "hope-attention" and self.window is not None:
            raise invalid("window", self.window,
                          "None for arch 'hope-attention' (its attention is global)")
        for name in ("memory_depth", "memory_expansion", "chunk_size", "inner_chunk_size"):
            check_int(name, getattr(self, name))
        for name in ("memory_momentum", "memory_weight_decay", "memory_normalize_values",
                     "cms_frozen"):
            _bool(name, getattr(self, name))
        if self.memory_dgd is not None:
            _bool("memory_dgd", self.memory_dgd)
        if isinstance(self.persistent_tokens, bool) or not isinstance(self.persistent_tokens, int) \
                or self.persistent_tokens < 0:
            raise invalid("persistent_tokens", repr(self.persistent_tokens), "an int >= 0")
        if self.persistent_tokens and self.arch not in ("titans", "titans-mag"):
            raise invalid("persistent_tokens", self.persistent_tokens,
                          f"0 for arch {self.arch!r} (persistent tokens are a Titans option)")
        object.__setattr__(self, "cms_chunk_sizes",
                           _int_tuple("cms_chunk_sizes", self.cms_chunk_sizes))
        _optional_positive_int("cms_hidden", self.cms_hidden)
        if self.cms_hidden is None:
            object.__setattr__(self, "cms_hidden", self.mlp_hidden)
        _choice("cms_mlp", self.cms_mlp, CMS_MLPS)
        _choice("cms_variant", self.cms_variant, CMS_VARIANTS)
        _choice("cms_teach_signal", self.cms_teach_signal, CMS_TEACH_SIGNALS)
        object.__setattr__(self, "cms_inner_lr",
                           _rates("cms_inner_lr", self.cms_inner_lr, len(self.cms_chunk_sizes)))
        _optional_positive_int("checkpoint_segment", self.checkpoint_segment)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def uses_memory_dgd(self) -> bool:
        """``memory_dgd`` resolved: the paper's DGD for HOPE, plain gradient steps for Titans."""
        return self.arch == "hope" if self.memory_dgd is None else self.memory_dgd

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are refused (a typo must not pass silently)."""
        return cls(**_from_dict(cls, data, "model config"))

    def computation_dict(self) -> dict[str, Any]:
        """``to_dict`` without the fields that change only memory use (``MEMORY_ONLY_FIELDS``):
        two configs with the same computation dict compute the same function and states."""
        data = self.to_dict()
        for name in MEMORY_ONLY_FIELDS:
            data.pop(name)
        return data

    def fingerprint(self) -> str:
        """Short hash of the configuration: tells states of different configs apart (a state
        passes between models that differ only in ``MEMORY_ONLY_FIELDS``)."""
        text = json.dumps(self.computation_dict(), sort_keys=True)
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
        check_int("num_classes", self.num_classes)
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
        text = json.dumps({"backbone": self.backbone.computation_dict(),
                           "num_classes": self.num_classes, "pooling": self.pooling},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_from_dict(kind: str, data: dict[str, Any]) -> ModelConfig | ClassifierConfig:
    """Rebuild a saved config of ``kind`` ("causal_lm" or "classifier")."""
    if kind == "causal_lm":
        return ModelConfig.from_dict(data)
    if kind == "classifier":
        return ClassifierConfig.from_dict(data)
    raise NestlearnError(f"model kind: got {kind!r}; allowed: 'causal_lm' or 'classifier'")
