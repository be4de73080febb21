"""Training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a folder ``RUN/checkpoints/step_00000050/`` holding

- ``model.safetensors`` and ``config.json``: the model, as ``save_pretrained`` writes it, so
  ``nestlearn.models.from_pretrained`` loads a checkpoint folder (the run's only copy of the
  weights: the final model is the latest checkpoint);
- ``state.safetensors``: every tensor of the optimizer state, the RNG states, the data
  sampler and, in stream training, the model state carried into the next step (one per
  process; flattened by :mod:`nestlearn.treeio`);
- ``checkpoint.json``: step, run config, the JSON skeletons of those states, the scheduler,
  counters, the SHA-256 of the other files and of the JSON payload itself.

It is written into a temporary folder beside its final place, flushed to disk and renamed into
place (``nestlearn.atomic.atomic_directory``), so a crash leaves either the old checkpoint or
the new one, never half of one. Loading verifies the format, every checksum and the tensor
files before returning anything, and ``check_model_tensors`` compares names, shapes and dtypes
with the live model before a single value is copied: a corrupt or mismatched checkpoint is
refused whole.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nestlearn.atomic import atomic_directory, remove_staging_leftovers, sha256_file
from nestlearn.errors import NestlearnError, ResourceError
from nestlearn.models.io import CONFIG_FILE as MODEL_CONFIG_FILE
from nestlearn.models.io import WEIGHTS_FILE as MODEL_FILE
from nestlearn.models.io import write_model_files
from nestlearn.training import failures
from nestlearn.treeio import flatten, unflatten

FORMAT = "nestlearn.checkpoint"
VERSION = 1
MANIFEST = "checkpoint.json"
STATE_FILE = "state.safetensors"
PREFIX = "step_"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Checkpoint:
    """A verified checkpoint read from disk (nothing applied to any object yet)."""

    path: Path
    step: int
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    sampler: Any
    rng: dict[str, Any]
    extra: dict[str, Any]
    carried: Any = None  # stream training's carried states (plain trees), else None
    # a sharded run's checkpoint: {"folder": "sharded", "world_size": N}; its model and
    # optimizer state are in that torch.distributed.checkpoint folder (model and optimizer
    # above are then empty: nestlearn.training.sharded loads them)
    sharded: dict[str, Any] | None = None


def capture_rng() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _payload_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint at ``step``: ``RUN/checkpoints/step_00000050``."""
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None before the first."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def last_good(run_dir: str | Path) -> str:
    """``the last good checkpoint is PATH (intact)``, or that there is none yet."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint is {latest} (intact)"


def _write_failures_as_resource_errors(save: F) -> F:
    """Decorator of :func:`save_checkpoint`: a write the machine refuses (no space, a file size
    limit, no write access) becomes one :class:`nestlearn.errors.ResourceError` line naming the
    checkpoint and the last good one; ``atomic_directory`` has removed the staging folder, and
    the earlier checkpoints are as they were."""

    @functools.wraps(save)
    def wrapper(run_dir: str | Path, *, step: int, **kwargs: Any) -> Path:
        try:
            return save(run_dir, step=step, **kwargs)
        except (OSError, SafetensorError) as err:
            if not failures.is_write_failure(err):
                raise
            raise ResourceError(f"checkpoint {checkpoint_dir(run_dir, step)}: cannot be written "
                                f"({failures.io_reason(err)}); "
                                f"{last_good(run_dir)}") from None

    return wrapper  # type: ignore[return-value]


@_write_failures_as_resource_errors
def save_checkpoint(run_dir: str | Path, *, step: int, config: dict[str, Any],
                    model: nn.Module, optimizer_state: dict[str, Any],
                    scheduler_state: dict[str, Any], sampler_state: Any,
                    rng_state: dict[str, Any], extra: dict[str, Any] | None = None,
                    keep: int | None = None, carried_state: Any = None) -> Path:
    """Write a checkpoint atomically and return its folder; keep only the newest ``keep``.
    ``carried_state``: a tree of dicts, tuples and tensors (None: nothing carried)."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    # one writer per run (rank 0): leftovers of a writer killed mid-save can go
    remove_staging_leftovers(final.parent)
    opt_skeleton, opt_tensors = flatten(optimizer_state, "optimizer/")
    sampler_skeleton, sampler_tensors = flatten(sampler_state, "sampler/")
    rng_skeleton, rng_tensors = flatten(rng_state, "rng/")
    carried_skeleton, carried_tensors = flatten(carried_state, "carried/")
    with atomic_directory(final) as tmp:
        write_model_files(model, tmp)
        save_file({**opt_tensors, **sampler_tensors, **rng_tensors, **carried_tensors},
                  str(tmp / STATE_FILE))
        payload = {
            "step": step,
            "config": config,
            "optimizer": opt_skeleton,
            "scheduler": scheduler_state,
            "sampler": sampler_skeleton,
            "rng": rng_skeleton,
            "extra": extra or {},
        }
        if carried_state is not None:
            payload["carried"] = carried_skeleton
        write_manifest(tmp, payload, [MODEL_FILE, MODEL_CONFIG_FILE, STATE_FILE])
    if keep is not None:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale)
    return final


def write_manifest(folder: Path, payload: dict[str, Any], files: list[str]) -> None:
    """``checkpoint.json`` of a checkpoint being written in ``folder``: ``payload`` and the
    SHA-256 of each of ``files`` (paths relative to ``folder``) and of the payload."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "files": {name: sha256_file(folder / name) for name in files},
        "payload": payload,
        "payload_sha256": _payload_digest(payload),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _corrupt(path: Path, why: str) -> NestlearnError:
    return NestlearnError(f"checkpoint {path}: refused, {why}")


def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint folder, payload)`` of a checkpoint folder (or a run folder: its latest
    checkpoint), after verifying the manifest and the checksum of every file."""
    path = Path(path)
    if not (path / MANIFEST).exists() and (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise NestlearnError(f"run {path}: has no checkpoint yet")
        path = latest
    if not path.is_dir():
        raise NestlearnError(f"checkpoint {path}: not found")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise _corrupt(path, f"{MANIFEST} is missing (not a complete checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, f"{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(path, f"{MANIFEST} is not a nestlearn checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise _corrupt(path, f"format version {manifest.get('version')!r}; allowed: {VERSION}")
    payload = manifest.get("payload")
    if not isinstance(payload, dict) or _payload_digest(payload) != manifest.get("payload_sha256"):
        raise _corrupt(path, f"checksum mismatch in {MANIFEST} (edited or damaged)")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _corrupt(path, f"{MANIFEST} lacks its file checksums")
    # checkpoints written before the model's config.json was added list only the tensor files
    for name in sorted({MODEL_FILE, STATE_FILE, *files}):
        file = path / name
        if not file.exists():
            raise _corrupt(path, f"{name} is missing")
        if sha256_file(file) != files.get(name):
            raise _corrupt(path, f"checksum mismatch in {name} (truncated or damaged)")
    missing = {"step", "config", "optimizer", "scheduler", "sampler", "rng"} - set(payload)
    if missing:
        raise _corrupt(path, f"{MANIFEST} lacks {sorted(missing)}")
    return path, payload


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint folder (or a run folder: its latest checkpoint). A sharded
    run's checkpoint is read without its model and optimizer tensors (``Checkpoint.sharded``)."""
    path, payload = read_manifest(path)
    sharded = payload.get("sharded")
    if sharded is not None and not isinstance(sharded, dict):
        raise _corrupt(path, f"{MANIFEST} has a malformed 'sharded' entry")
    tensors: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: {}}
    for name in (STATE_FILE,) if sharded else (MODEL_FILE, STATE_FILE):
        file = path / name
        try:
            tensors[name] = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise _corrupt(path, f"{name} cannot be read ({err})") from None
    state = tensors[STATE_FILE]
    return Checkpoint(
        path=path,
        step=int(payload["step"]),
        config=payload["config"],
        model=tensors[MODEL_FILE],
        optimizer={} if sharded else unflatten(payload["optimizer"], state),
        scheduler=payload["scheduler"],
        sampler=unflatten(payload["sampler"], state),
        rng=unflatten(payload["rng"], state),
        extra=payload.get("extra", {}),
        carried=unflatten(payload.get("carried"), state),
        sharded=sharded,
    )


def check_model_tensors(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """Refuse (before loading anything) tensors that do not match ``model`` exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(checkpoint.model))
    unexpected = sorted(set(checkpoint.model) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:3]}")
        raise _corrupt(checkpoint.path, "model does not match: " + "; ".join(parts))
    for name, tensor in expected.items():
        got = checkpoint.model[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise _corrupt(
                checkpoint.path,
                f"model tensor {name}: got {tuple(got.shape)} {got.dtype}; "
                f"allowed: {tuple(tensor.shape)} {tensor.dtype}",
            )


def check_optimizer_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer state whose groups or parameters do not match ``optimizer``
    (a ``MultiFrequency``'s state holds the wrapped optimizer's state and the periods)."""
    from nestlearn.optim.levels import MultiFrequency

    saved = checkpoint.optimizer
    if isinstance(optimizer, MultiFrequency):
        if not isinstance(saved, dict) or "optimizer" not in saved or "periods" not in saved:
            raise _corrupt(checkpoint.path, "optimizer state has no multi-frequency levels; "
                           "allowed: a state saved with the same optim.levels")
        periods = [group["period"] for group in optimizer.param_groups]
        if list(saved["periods"]) != periods:
            raise _corrupt(checkpoint.path, f"optimizer level periods {saved['periods']}; "
                           f"allowed: {periods} (the same optim.levels)")
        saved, optimizer = saved["optimizer"], optimizer.optimizer
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise _corrupt(checkpoint.path, "optimizer state is malformed")
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved["param_groups"]
    if len(groups) != len(saved_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, saved_groups, strict=True)
    ):
        raise _corrupt(
            checkpoint.path,
            f"optimizer has {[len(g['params']) for g in saved_groups]} parameters per group; "
            f"allowed: {[len(g['params']) for g in groups]} (a different optimizer or model)",
        )
