"""Model configurations: one tree of validated, frozen dataclasses that round-trips through JSON.

``ModelConfig`` holds the model-wide fields (arch, vocabulary, width, depth, heads, the MLP,
initialization, checkpointing) and the layer configs themselves as sub-configs:

- ``attention``: ``nestlearn.nn.transformer.AttentionConfig`` (window, RoPE base);
- ``memory``: the memory mixer's ``NeuralMemoryConfig`` (Titans) or
  ``SelfModifyingTitansConfig`` (HOPE);
- ``cms``: the Continuum Memory System's ``CMSConfig``.

Each option is declared, documented and validated once, in its layer's config. The fields a
layer shares with the model (width, heads, norm epsilon, initialization) are set by the model
and cannot be set in a section. Which sections an arch has, and how its block is built, is
one ``ArchSpec`` in the arch registry (``nestlearn.models.archs``); a new arch is one builder
function plus one ``register_arch`` call. A wrong value fails at construction with a message
naming the field (``memory.chunk_size: got 0; allowed: an int >= 1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from nestlearn.errors import (
    NestlearnError,
    check_bool,
    check_choice,
    check_int,
    check_optional_int,
    check_positive,
    invalid,
)
from nestlearn.models.migrate import is_flat_model_dict, migrate_flat_model_dict
from nestlearn.nn.cms import CMSConfig
from nestlearn.nn.self_modifying import SelfModifyingTitansConfig
from nestlearn.nn.titans import NeuralMemoryConfig
from nestlearn.nn.transformer import AttentionConfig

if TYPE_CHECKING:
    from torch import nn

POOLINGS: tuple[str, ...] = ("mean", "last")
# How an arch uses attention: none (no attention section), global (window must be None),
# optional (any window) or windowed (a window is required).
ATTENTION_MODES: tuple[str, ...] = ("none", "global", "optional", "windowed")
# ModelConfig fields that change memory use and speed but not what the model computes.
MEMORY_ONLY_FIELDS: tuple[str, ...] = ("checkpoint_segment",)
SECTIONS: tuple[str, ...] = ("attention", "memory", "cms")
MemoryConfig = NeuralMemoryConfig | SelfModifyingTitansConfig


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: the sections its blocks use and the function that builds a block.

    ``memory``: the memory mixer's config class (None: no memory); ``memory_defaults``: the
    model's defaults where they differ from the layer's own; ``cms``: whether blocks hold a
    CMS; ``attention``: one of ``ATTENTION_MODES``; ``build_block(config)``: one block.
    """

    name: str
    build_block: Callable[[ModelConfig], nn.Module]
    description: str
    attention: str = "none"
    memory: type | None = None
    memory_defaults: Mapping[str, Any] = field(default_factory=dict)
    cms: bool = False

    def __post_init__(self) -> None:
        check_choice("attention", self.attention, ATTENTION_MODES)
        if self.memory not in (None, NeuralMemoryConfig, SelfModifyingTitansConfig):
            raise invalid("memory", repr(self.memory),
                          "None, NeuralMemoryConfig or SelfModifyingTitansConfig")


# The arch registry, filled by ``nestlearn.models.archs`` (imported with ``nestlearn.models``).
ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry; a name is registered once."""
    if spec.name in ARCHS:
        raise NestlearnError(f"arch {spec.name!r} is already registered")
    ARCHS[spec.name] = spec
    return spec


def arch_spec(name: object) -> ArchSpec:
    if name not in ARCHS:
        raise invalid("arch", repr(name), f"one of {list(ARCHS)}")
    return ARCHS[name]


def _unknown_keys(cls: type, data: object, where: str, derived: Mapping[str, Any] = {}
                  ) -> dict[str, Any]:
    """``data`` as a dict whose keys are fields of ``cls`` that the caller may set."""
    if not isinstance(data, dict):
        raise invalid(where, type(data).__name__, "a JSON object")
    names = {f.name for f in dataclasses.fields(cls)} - set(derived)
    unknown = sorted(set(data) - names)
    if unknown:
        raise invalid(f"{where} keys", unknown, f"fields of {cls.__name__}: {sorted(names)}")
    return dict(data)


def _build_section(name: str, cls: type, value: object, defaults: Mapping[str, Any],
                   derived: Mapping[str, Any]) -> Any:
    """A section's layer config from None (defaults), a dict or a config of class ``cls``;
    the fields the model sets (``derived``) are filled in, and errors name the section."""
    if value is None:
        kwargs = dict(defaults)
    elif isinstance(value, dict):
        kwargs = {**defaults, **_unknown_keys(cls, value, name, derived)}
    elif isinstance(value, cls):
        kwargs = {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)
                  if f.name not in derived}
    else:
        raise invalid(name, type(value).__name__,
                      f"a {cls.__name__}, a dict of its fields, or None (the arch's defaults)")
    try:
        return cls(**kwargs, **derived)
    except NestlearnError as err:
        raise NestlearnError(f"{name}.{err}") from None
    except TypeError as err:
        raise NestlearnError(f"{name}: {err}") from None


def _section_dict(section: Any, derived: Mapping[str, Any]) -> dict[str, Any] | None:
    if section is None:
        return None
    data = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if f.name not in derived}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal LM (``build_model``) and of the classifier backbones.

    Model-wide fields: ``arch`` (a registered arch: ``ARCHS``), ``vocab_size``, ``dim``,
    ``layers`` (blocks), ``heads`` (attention and memory heads), ``mlp_hidden`` (SwiGLU hidden
    size; None: ``8 * dim / 3`` rounded up to a multiple of 8, the Transformer++ choice;
    ``mlp_width`` is the number in use), ``tie_embeddings`` (the head shares the embedding
    matrix), ``norm_eps``, ``init_std``.

    Sections (None: the arch's defaults; a dict of fields or a layer config also work; an arch
    without the section must leave it None):
    ``attention`` (``AttentionConfig``: ``window``, ``rope_base``) for ``transformer`` (any
    window), ``titans-mag`` (a window is required: its attention branch is local by design)
    and ``hope-attention`` (global only);
    ``memory``: ``NeuralMemoryConfig`` for ``titans`` and ``titans-mag``,
    ``SelfModifyingTitansConfig`` for ``hope`` (models default to ``inner_chunk_size=16`` and
    ``normalize_values=True``); their ``dim``, ``heads`` and ``head_dim`` are the model's;
    ``cms``: ``CMSConfig`` for ``hope`` and ``hope-attention``; its ``dim``, ``norm_eps`` and
    initialization are the model's and ``hidden=None`` means ``mlp_width``.

    ``checkpoint_segment``: activation checkpointing over the sequence (None = off). With
    gradients enabled, the backbone runs the sequence in segments of this many tokens, each
    block on each segment under ``torch.utils.checkpoint`` with the block's state carried from
    segment to segment: only the blocks' inputs and states at segment boundaries are kept, and
    one block-segment's activations are recomputed at a time in backward. Logits, final state
    and gradients are those of one pass (each block streams exactly); it changes memory and
    time only, so it is left out of ``fingerprint`` and does nothing without gradients.
    """

    SECTIONS: ClassVar[tuple[str, ...]] = SECTIONS

    arch: str = "transformer"
    vocab_size: int = 256
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_hidden: int | None = None
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attention: AttentionConfig | None = None
    memory: NeuralMemoryConfig | SelfModifyingTitansConfig | None = None
    cms: CMSConfig | None = None
    checkpoint_segment: int | None = None

    def __post_init__(self) -> None:
        spec = arch_spec(self.arch)
        for name in ("vocab_size", "dim", "layers", "heads"):
            check_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise invalid("heads", self.heads, f"a divisor of dim={self.dim}")
        if spec.attention != "none" and (self.dim // self.heads) % 2:
            raise invalid("heads", self.heads,
                          f"a divisor of dim={self.dim} leaving an even head size (RoPE)")
        check_optional_int("mlp_hidden", self.mlp_hidden)
        check_bool("tie_embeddings", self.tie_embeddings)
        for name in ("norm_eps", "init_std"):
            check_positive(name, getattr(self, name))
        check_optional_int("checkpoint_segment", self.checkpoint_segment)
        self._set_sections(spec)

    def _set_sections(self, spec: ArchSpec) -> None:
        wanted = {"attention": AttentionConfig if spec.attention != "none" else None,
                  "memory": spec.memory, "cms": CMSConfig if spec.cms else None}
        for name in SECTIONS:
            value = getattr(self, name)
            cls = wanted[name]
            if cls is None:
                if value is not None:
                    raise invalid(name, type(value).__name__,
                                  f"None for arch {self.arch!r} (it has no {name})")
                continue
            defaults = spec.memory_defaults if name == "memory" else {}
            section = _build_section(name, cls, value, defaults, self.derived_fields(name))
            object.__setattr__(self, name, section)
        window = self.attention.window if self.attention is not None else None
        if spec.attention == "windowed" and window is None:
            raise invalid("attention.window", None,
                          f"an int >= 1 for arch {self.arch!r} (sliding window)")
        if spec.attention == "global" and window is not None:
            raise invalid("attention.window", window,
                          f"None for arch {self.arch!r} (its attention is global)")

    def derived_fields(self, section: str) -> dict[str, Any]:
        """The fields of ``section``'s layer config that the model sets, with their values."""
        if section == "memory":
            return {"dim": self.dim, "heads": self.heads, "head_dim": None}
        if section == "cms":
            return {"dim": self.dim, "norm_eps": self.norm_eps, "init_std": self.init_std,
                    "out_init_std": self.out_init_std}
        return {}

    def replace_field(self, name: str, value: Any) -> ModelConfig:
        """A copy with ``name`` set. A new ``arch`` keeps the sections it also uses and takes
        its defaults for the others (so ``--set model.arch=titans`` works on any recipe)."""
        if name != "arch" or value == self.arch:
            return dataclasses.replace(self, **{name: value})
        spec = arch_spec(value)
        keep = {"attention": spec.attention != "none" and self.attention is not None,
                "memory": spec.memory is not None and isinstance(self.memory, spec.memory),
                "cms": spec.cms}
        sections = {s: getattr(self, s) if keep[s] else None for s in SECTIONS}
        if spec.attention == "global" and sections["attention"] is not None:
            sections["attention"] = dataclasses.replace(sections["attention"], window=None)
        return dataclasses.replace(self, arch=value, **sections)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_width(self) -> int:
        """``mlp_hidden``, or ``8 * dim / 3`` rounded up to a multiple of 8 when it is None."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-8 * self.dim // 3 // 8) * 8

    @property
    def out_init_std(self) -> float:
        """Std of the output projections: ``init_std / sqrt(2 * layers)`` (GPT-2 style), so the
        residual stream's variance does not grow with depth."""
        return self.init_std / math.sqrt(2 * self.layers)

    @property
    def spec(self) -> ArchSpec:
        return ARCHS[self.arch]

    def cms_layer_config(self) -> CMSConfig:
        """The CMS config a block is built with (``hidden=None`` resolved to ``mlp_width``)."""
        if self.cms is None:
            raise invalid("cms", None, f"a CMS section (arch {self.arch!r} has none)")
        if self.cms.hidden is None:
            return dataclasses.replace(self.cms, hidden=self.mlp_width)
        return self.cms

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict; the fields a section takes from the model are left out."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                if f.name not in SECTIONS}
        for name in SECTIONS:
            data[name] = _section_dict(getattr(self, name), self.derived_fields(name))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are refused (a typo must not pass silently).
        A flat dict of the 0.1 format (``memory_depth``, ``cms_chunk_sizes``, ...) is migrated
        to the nested tree first (``nestlearn.models.migrate``)."""
        if isinstance(data, dict) and is_flat_model_dict(data):
            data = migrate_flat_model_dict(data, ARCHS)
        return cls(**_unknown_keys(cls, data, "model config"))

    def computation_dict(self) -> dict[str, Any]:
        """``to_dict`` without the fields that change only memory use (``MEMORY_ONLY_FIELDS``):
        two configs with the same computation dict compute the same function and states."""
        data = self.to_dict()
        for name in MEMORY_ONLY_FIELDS:
            data.pop(name)
        memory = data.get("memory")
        if memory is not None:
            memory.pop("use_naive", None)  # the per-token reference computes the same function
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
        check_choice("pooling", self.pooling, POOLINGS)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.to_dict(), "num_classes": self.num_classes,
                "pooling": self.pooling}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        return cls(**_unknown_keys(cls, data, "classifier config"))

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
