"""Save and load models: safetensors for tensors, JSON for the config, a SHA-256 checksum.

A checkpoint directory holds ``model.safetensors`` and ``config.json`` (kind, config, tensor
manifest, checksum); a training checkpoint holds the same two files beside the training state,
so ``from_pretrained`` loads it too. It is written to a temporary sibling directory and renamed
into place (``nestlearn.atomic.atomic_directory``), so a crash never leaves a half-written
checkpoint under the final name; loading verifies the checksum and that the tensors match the
model the config builds, name by name and shape by shape. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nestlearn import __version__
from nestlearn.atomic import atomic_directory, sha256_file
from nestlearn.errors import NestlearnError, invalid
from nestlearn.models.config import ClassifierConfig, ModelConfig, config_from_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "nestlearn-model"
FORMAT_VERSION = 1


def _kind(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return "causal_lm"
    if isinstance(config, ClassifierConfig):
        return "classifier"
    raise invalid("model", type(model).__name__,
                  "a nestlearn model (built by build_model or build_classifier)")


def _is_checkpoint(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_model_files(model: nn.Module, directory: str | Path,
                      state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model``'s weights and ``config.json`` into the existing folder ``directory``
    (not atomic by itself: :func:`save_pretrained` and training checkpoints call it inside
    ``nestlearn.atomic.atomic_directory``). ``state``: the weights to write instead of
    ``model.state_dict()`` (a sharded model's, gathered whole)."""
    kind = _kind(model)
    folder = Path(directory)
    tensors = {name: tensor.detach().to("cpu").contiguous()
               for name, tensor in (model.state_dict() if state is None else state).items()}
    weights = folder / WEIGHTS_FILE
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nestlearn_version": __version__,
        "kind": kind,
        "config": model.config.to_dict(),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                    for name, t in tensors.items()},
        "sha256": sha256_file(weights),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` to ``directory`` atomically; return the directory.

    An existing checkpoint there is replaced; an existing non-empty directory that is not a
    nestlearn checkpoint is refused rather than overwritten.
    """
    _kind(model)
    target = Path(directory)
    if target.exists() and (not target.is_dir()
                            or (any(target.iterdir()) and not _is_checkpoint(target))):
        raise invalid("directory", str(target),
                      "a new path, an empty directory or an existing nestlearn checkpoint")
    with atomic_directory(target) as staging:
        write_model_files(model, staging)
    return target


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise invalid("directory", str(directory), "an existing checkpoint directory")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise NestlearnError(f"checkpoint {directory}: missing {CONFIG_FILE}")
    try:
        meta = json.loads(config_path.read_text())
    except ValueError as err:
        raise NestlearnError(f"checkpoint {config_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NestlearnError(f"checkpoint {config_path}: not a {FORMAT} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise invalid("format_version", meta.get("format_version"), str(FORMAT_VERSION))
    return meta


def _check_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   where: Path) -> None:
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    mismatched = [f"{name}: saved {tuple(loaded[name].shape)}, model {tuple(tensor.shape)}"
                  for name, tensor in expected.items()
                  if name in loaded and loaded[name].shape != tensor.shape]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if mismatched:
        problems.append(f"mismatched shapes [{'; '.join(mismatched)}]")
    if problems:
        raise NestlearnError(f"checkpoint {where} does not match its config: "
                             + ", ".join(problems))


def from_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by ``save_pretrained`` (verified; in the saved dtype, on ``device``).

    Raises ``NestlearnError`` when the checksum does not match (modified or corrupted weights)
    or when tensors are missing, unexpected or of the wrong shape.
    """
    from nestlearn.models.build import build_classifier, build_model

    where = Path(directory)
    meta = _read_meta(where)
    weights = where / WEIGHTS_FILE
    if not weights.is_file():
        raise NestlearnError(f"checkpoint {where}: missing {WEIGHTS_FILE}")
    checksum = sha256_file(weights)
    if checksum != meta.get("sha256"):
        raise NestlearnError(f"checkpoint {weights}: SHA-256 {checksum} does not match the "
                             f"recorded {meta.get('sha256')} (file modified or corrupted)")
    kind = meta.get("kind")
    config = config_from_dict(kind, meta.get("config"))
    model = build_model(config) if kind == "causal_lm" else build_classifier(config)
    loaded = load_file(str(weights), device="cpu")
    _check_tensors(loaded, model.state_dict(), weights)
    dtypes = {t.dtype for t in loaded.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(loaded, strict=True)
    return model.to(device)
