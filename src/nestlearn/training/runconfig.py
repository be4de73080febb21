"""Run configuration: one validated dataclass tree for a training run.

``RunConfig`` holds ``model`` (``nestlearn.models.ModelConfig``), ``data``, ``optim``,
``schedule`` and ``train`` sections. Each section validates itself in ``__post_init__``, so a
wrong value fails at once with a message naming the field, the value and what is allowed.

Any field can be overridden by a dotted path with a string value, as the CLI's
``--set model.dim=256`` or ``--set model.cms.inner_lr=1e-4`` does: the string is parsed to the
field's declared type (int, float, bool, str, ``X | None``, ``Literal``, tuples), and an unknown
field or a value of the wrong type is one clear ``NestlearnError``. A model section's fields that
the model sets (its width) are refused there, and a new ``model.arch`` swaps in the sections
that arch uses (``ModelConfig.replace_field``). ``to_dict`` / ``from_dict`` give a lossless JSON
form; the model section reads 0.1 flat model configs too.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from nestlearn.data.tokenizers import TOKENIZER_CHOICES, is_tokenizer_path
from nestlearn.errors import (
    NestlearnError,
    check_bool,
    check_choice,
    check_decay,
    check_int,
    check_nonnegative,
    check_number,
    check_unit,
    invalid,
)
from nestlearn.training.wandb_sink import WANDB_MODES

OPTIMIZERS: tuple[str, ...] = (
    "adamw",
    "sgd",
    "muon",
    "m3",
    "delta-momentum",
    "preconditioned-momentum",
    "deep-momentum",
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
TOKENIZERS: tuple[str, ...] = ("byte", "bpe")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
DTYPES: tuple[str, ...] = ("float32", "float64")
AUTOCAST: tuple[str, ...] = ("auto", "bf16", "off")
SAMPLINGS: tuple[str, ...] = ("windows", "stream")
PARALLEL: tuple[str, ...] = ("ddp", "fsdp")


@dataclass
class DataConfig:
    """What text the run reads and how it is cut into batches."""

    corpus: str = "shakespeare"  # a name from nestlearn.data.corpora, or a text file / folder
    # "byte" (no files), "bpe" (trained on the train split) or a pretrained tokenizer.json path
    tokenizer: str = "byte"
    vocab_size: int = 512  # BPE vocabulary size; the byte tokenizer's is fixed
    seq_len: int = 128  # tokens per training window
    batch_size: int = 16  # global batch: split across ranks under torchrun
    train_split: str = "train"
    eval_split: str = "validation"
    # "windows": random windows, each from a fresh state; "stream": every batch row reads its
    # documents in order and the state is carried between steps (see train.state_reset)
    sampling: str = "windows"

    def __post_init__(self) -> None:
        if not isinstance(self.corpus, str) or not self.corpus.strip():
            raise invalid("data.corpus", repr(self.corpus), "a corpus name or a path")
        if self.tokenizer not in TOKENIZERS and not (
                isinstance(self.tokenizer, str) and is_tokenizer_path(self.tokenizer)):
            raise invalid("data.tokenizer", repr(self.tokenizer), TOKENIZER_CHOICES)
        check_int("data.vocab_size", self.vocab_size, 258)
        check_int("data.seq_len", self.seq_len)
        check_int("data.batch_size", self.batch_size)
        check_choice("data.train_split", self.train_split, SPLITS)
        check_choice("data.eval_split", self.eval_split, SPLITS)
        check_choice("data.sampling", self.sampling, SAMPLINGS)


@dataclass
class OptimConfig:
    """The outer optimizer (``nestlearn.optim`` for all but adamw and sgd)."""

    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.1  # decoupled; matrices only (not norms, biases, scalars)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW moments (and fallbacks inside others)
    momentum: float = 0.9  # momentum of sgd, muon, m3 and the deep-momentum family
    eps: float = 1e-8
    # nestlearn optimizers give non-matrix parameters (norms, biases; see optim/README.md)
    # an AdamW step with this learning rate; it follows the same schedule as lr
    fallback_lr: float = 3e-3
    # multi-frequency levels (nestlearn.optim.MultiFrequency): "PATTERN=PERIOD" items; the
    # parameters whose names match the glob PATTERN step every PERIOD steps with the gradients
    # summed over the period (docs/paper.md section 3); the others every step
    levels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        self.level_periods()
        check_nonnegative("optim.lr", self.lr)
        check_nonnegative("optim.weight_decay", self.weight_decay)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise invalid("optim.betas", repr(self.betas), "two numbers in [0, 1)")
        for i, beta in enumerate(self.betas):
            check_decay(f"optim.betas[{i}]", beta)
        check_decay("optim.momentum", self.momentum)
        check_number("optim.eps", self.eps, 0, 1, open_low=True)
        check_nonnegative("optim.fallback_lr", self.fallback_lr)

    def level_periods(self) -> list[tuple[str, int]]:
        """``levels`` as ``(pattern, period)`` pairs, checked (periods >= 1, no pattern twice)."""
        allowed = "PATTERN=PERIOD items, e.g. 'backbone.blocks.*.cms.*=8' (period >= 1)"
        if not isinstance(self.levels, tuple):
            raise invalid("optim.levels", repr(self.levels), allowed)
        pairs: list[tuple[str, int]] = []
        for index, item in enumerate(self.levels):
            pattern, _, period = item.rpartition("=") if isinstance(item, str) else ("", "", "")
            pattern = pattern.strip()
            if not pattern or not period.strip().isdigit() or int(period) < 1:
                raise invalid(f"optim.levels[{index}]", repr(item), allowed)
            if pattern in (p for p, _ in pairs):
                raise invalid(f"optim.levels[{index}]", repr(item), "each pattern once")
            pairs.append((pattern, int(period)))
        return pairs


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

    kind: str = "cosine"  # "cosine" or "constant" (after warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, SCHEDULES)
        check_int("schedule.warmup_steps", self.warmup_steps, 0)
        check_unit("schedule.min_lr_ratio", self.min_lr_ratio)


def reset_interval(state_reset: object) -> int | None:
    """Segments between resets of ``train.state_reset="every:N"`` (N), None for the other
    policies; anything else is refused."""
    if state_reset in ("document", "never"):
        return None
    head, _, count = str(state_reset).partition(":")
    if head != "every" or not count.isdigit() or int(count) < 1:
        raise invalid("train.state_reset", repr(state_reset),
                      "document, never or every:N with N >= 1 (e.g. every:8)")
    return int(count)


@dataclass
class TrainConfig:
    """Loop length, evaluation, checkpoints, seed and device."""

    steps: int = 1000
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_every: int = 200  # evaluate every N steps (and at the end); 0: only at the end
    eval_iters: int = 20  # batches per evaluation
    checkpoint_every: int = 200  # 0: only at the end (and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2  # older step checkpoints are removed
    log_every: int = 10  # train metrics rows every N steps
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:N"
    dtype: str = "float32"  # parameter dtype
    autocast: str = "auto"  # "auto": bf16 autocast on CUDA only; "bf16"; "off"
    compile: bool = False  # torch.compile the memory ops' chunk steps (eager if that fails)
    # replay each step's forward and backward from a CUDA graph (nestlearn.training.cuda_graph)
    cuda_graph: bool = False
    out_dir: str = "runs/default"
    # DDP: parameters without a gradient must be declared; detected by a probe pass when false
    find_unused_parameters: bool = False
    # how torchrun's processes share the model: "ddp" (a whole copy on every rank) or "fsdp"
    # (FSDP2: parameters, gradients and optimizer states sharded; nestlearn.training.sharded)
    parallel: str = "ddp"
    # estimate a step's memory before the first step and refuse one that cannot fit
    # (nestlearn.training.memory_budget); false: try anyway
    memory_check: bool = True
    # data.sampling="stream": when a row's carried state restarts from the fresh state:
    # "document" (at each new document), "never", "every:N" (all rows every N segments)
    state_reset: str = "document"
    # Weights & Biases: the project the metric rows also go to (None: no W&B; needs the
    # `nestlearn[wandb]` extra); wandb_mode "auto" leaves the choice to wandb (WANDB_MODE)
    wandb_project: str | None = None
    wandb_mode: str = "auto"

    def __post_init__(self) -> None:
        check_int("train.steps", self.steps)
        check_nonnegative("train.grad_clip", self.grad_clip)
        check_int("train.eval_every", self.eval_every, 0)
        check_int("train.eval_iters", self.eval_iters)
        check_int("train.checkpoint_every", self.checkpoint_every, 0)
        check_int("train.keep_checkpoints", self.keep_checkpoints)
        check_int("train.log_every", self.log_every)
        check_int("train.seed", self.seed, 0)
        if not (self.device in ("auto", "cpu", "cuda")
                or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise invalid("train.device", repr(self.device), "auto, cpu, cuda, cuda:N")
        check_choice("train.dtype", self.dtype, DTYPES)
        check_choice("train.autocast", self.autocast, AUTOCAST)
        check_bool("train.compile", self.compile)
        check_bool("train.cuda_graph", self.cuda_graph)
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise invalid("train.out_dir", repr(self.out_dir), "a directory path")
        check_bool("train.memory_check", self.memory_check)
        check_choice("train.parallel", self.parallel, PARALLEL)
        reset_interval(self.state_reset)
        if self.wandb_project is not None and (not isinstance(self.wandb_project, str)
                                               or not self.wandb_project.strip()):
            raise invalid("train.wandb_project", repr(self.wandb_project),
                          "a W&B project name, or none")
        check_choice("train.wandb_mode", self.wandb_mode, WANDB_MODES)


def _default_model() -> Any:
    from nestlearn.models import ModelConfig

    return ModelConfig()


@dataclass
class RunConfig:
    """A whole training run. ``model`` is a ``nestlearn.models.ModelConfig``."""

    name: str = "custom"
    model: Any = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for section, cls in (("data", DataConfig), ("optim", OptimConfig),
                             ("schedule", ScheduleConfig), ("train", TrainConfig)):
            if not isinstance(getattr(self, section), cls):
                raise invalid(section, type(getattr(self, section)).__name__, cls.__name__)
        if not dataclasses.is_dataclass(self.model):
            raise invalid("model", type(self.model).__name__, "a ModelConfig")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        from nestlearn.models import ModelConfig

        if isinstance(data, dict) and "model" in data:
            try:
                model = ModelConfig.from_dict(data["model"])
            except NestlearnError as err:
                raise NestlearnError(f"model.{err}") from None
            rest = from_dict(cls, {k: v for k, v in data.items() if k != "model"})
            return dataclasses.replace(rest, model=model)
        return from_dict(cls, data)


# ---- config dataclasses to and from JSON-ready dicts ---------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass; tuples become lists. A section with
    its own ``to_dict`` (``ModelConfig``) writes itself."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "to_dict"):
            out[f.name] = value.to_dict()
        elif dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def from_dict(cls: type, data: dict[str, Any], overrides: dict[str, type] | None = None,
              path: str = "") -> Any:
    """Build ``cls`` from :func:`to_dict` output, converting each value to its field's type.
    ``overrides`` gives the class of fields annotated loosely (``model: Any``)."""
    if not isinstance(data, dict):
        raise invalid(path or "config", type(data).__name__, "a JSON object")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{path}." if path else ""
        raise NestlearnError(
            f"{where}{unknown[0]}: unknown field; allowed: {', '.join(names)}"
        )
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in data:
            continue
        tp = (overrides or {}).get(name, hints[name])
        dotted = f"{path}.{name}" if path else name
        value = data[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, path=dotted)
        else:
            kwargs[name] = coerce(value, tp, dotted)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a JSON value (or a parsed string) to type ``tp``, or raise naming ``name``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except NestlearnError as err:
                errors.append(err)
        raise invalid(name, repr(value), _type_name(tp))
    if origin is Literal:
        if value in args:
            return value
        raise invalid(name, repr(value), ", ".join(repr(a) for a in args))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise invalid(name, repr(value), _type_name(tp))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise invalid(name, repr(value), f"{len(args)} values ({_type_name(tp)})")
            pairs = enumerate(zip(value, args, strict=True))
            items = [coerce(v, a, f"{name}[{i}]") for i, (v, a) in pairs]
        else:
            inner = args[0] if args else Any
            items = [coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise invalid(name, repr(value), "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise invalid(name, repr(value), "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise invalid(name, repr(value), "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise invalid(name, repr(value), "a string")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path=name)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise invalid(name, repr(value), _type_name(tp))


def parse_text(text: str, tp: Any, name: str) -> Any:
    """Parse a command-line string to type ``tp`` (``--set`` values)."""
    raw = text.strip()
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_text(raw, arg, name)
            except NestlearnError:
                continue
        raise invalid(name, repr(text), _type_name(tp))
    if origin is Literal:
        for arg in args:
            if str(arg) == raw:
                return arg
        raise invalid(name, repr(text), ", ".join(str(a) for a in args))
    if origin in (tuple, list):
        body = raw[1:-1] if raw[:1] in "([" and raw[-1:] in ")]" else raw
        parts = [p for p in (s.strip() for s in body.split(",")) if p] if body.strip() else []
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            inner = [args[0]] * len(parts)
        elif origin is tuple and args:
            if len(parts) != len(args):
                raise invalid(name, repr(text), f"{len(args)} comma-separated values")
            inner = list(args)
        else:
            inner = [args[0] if args else str] * len(parts)
        pairs = enumerate(zip(parts, inner, strict=True))
        items = [parse_text(p, a, f"{name}[{i}]") for i, (p, a) in pairs]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise invalid(name, repr(text), "true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise invalid(name, repr(text), "an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise invalid(name, repr(text), "a number") from None
    if tp is str or tp is Any:
        return raw
    raise invalid(name, repr(text), f"a value of type {_type_name(tp)} (not settable from text)")


def _derived(config: Any, section: str) -> dict[str, Any]:
    """Fields of ``section`` that ``config`` sets itself (a model's width in its layers)."""
    derived = getattr(config, "derived_fields", None)
    return derived(section) if derived is not None else {}


def field_names(config: Any, prefix: str = "") -> list[str]:
    """All dotted leaf field paths of a config tree that can be set (for help and errors)."""
    names: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            hidden = {f"{dotted}.{name}" for name in _derived(config, f.name)}
            names.extend(n for n in field_names(value, dotted + ".") if n not in hidden)
        else:
            names.append(dotted)
    return names


def _replace(config: Any, name: str, value: Any) -> Any:
    """``dataclasses.replace`` for one field, through the config's own ``replace_field`` if it
    has one (a model config changing arch swaps the sections the new arch uses)."""
    replace_field = getattr(config, "replace_field", None)
    if replace_field is not None:
        return replace_field(name, value)
    return dataclasses.replace(config, **{name: value})


def set_field(config: Any, dotted: str, text: str, _prefix: str = "") -> Any:
    """Return a copy of ``config`` with the field at ``dotted`` set from ``text``; every
    section on the path is rebuilt so its validation runs again."""
    head, _, rest = dotted.partition(".")
    here = f"{_prefix}{head}"
    names = [f.name for f in dataclasses.fields(config)]
    if head not in names:
        where = f"fields of {_prefix[:-1]}" if _prefix else "sections"
        raise NestlearnError(f"unknown field {here!r}; allowed {where}: {', '.join(names)}")
    current = getattr(config, head)
    if rest:
        if current is None and head in _section_names(config):
            raise NestlearnError(f"{here!r} is not used by this config (it is None)")
        if not dataclasses.is_dataclass(current):
            raise NestlearnError(f"{here!r} is a value, not a section")
        field_name = rest.partition(".")[0]
        if field_name in _derived(config, head):
            raise NestlearnError(f"{here}.{field_name!s} is set by {_prefix}{field_name}, "
                                 "not in the section")
        return _replace(config, head, set_field(current, rest, text, f"{here}."))
    if dataclasses.is_dataclass(current):
        raise NestlearnError(
            f"{here!r} is a section; allowed: "
            + ", ".join(f"{here}.{n}" for n in field_names(current))
        )
    tp = typing.get_type_hints(type(config))[head]
    return _replace(config, head, parse_text(text, tp, here))


def _section_names(config: Any) -> tuple[str, ...]:
    """Fields of ``config`` that hold a section or None (model configs declare them)."""
    return getattr(config, "SECTIONS", ())


def check_cuda_graph(config: RunConfig) -> None:
    """What ``train.cuda_graph`` cannot replay, refused before a run builds anything. Checked
    on the whole config (not field by field, so that the order of ``--set`` does not matter);
    the device ``auto`` resolves to and the process count are checked by the Trainer."""
    if not config.train.cuda_graph:
        return
    if config.train.device == "cpu":
        raise NestlearnError("train.cuda_graph: got true with train.device='cpu'; "
                             "allowed: true on a CUDA device, false elsewhere")
    if config.data.sampling == "stream":
        raise NestlearnError(
            "train.cuda_graph: got true with data.sampling='stream'; allowed: "
            "data.sampling='windows' (a carried state holds each layer's position as a "
            "Python int that grows every segment, so no captured step could be replayed)")
    segment = getattr(config.model, "checkpoint_segment", None)  # a ModelConfig field
    if segment is not None:
        raise NestlearnError(
            f"train.cuda_graph: got true with model.checkpoint_segment={segment}; allowed: "
            "model.checkpoint_segment=None (activation checkpointing reads the CUDA RNG "
            "state, which a capture refuses)")


def apply_overrides(config: RunConfig, assignments: list[str]) -> RunConfig:
    """Apply ``a.b=value`` strings in order; errors name the assignment and the field."""
    if isinstance(assignments, str):
        raise invalid("assignments", repr(assignments), "a list of FIELD=VALUE strings")
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise invalid("--set", repr(assignment), "FIELD=VALUE, e.g. model.dim=256")
        try:
            config = set_field(config, key.strip(), value)
        except (NestlearnError, TypeError) as err:
            raise NestlearnError(f"--set {assignment}: {err}") from None
    return config


def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two configs of the same shape."""
    da = to_dict(a) if dataclasses.is_dataclass(a) else a
    db = to_dict(b) if dataclasses.is_dataclass(b) else b
    out: list[str] = []
    for key in sorted(set(da) | set(db)):
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
