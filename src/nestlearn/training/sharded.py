"""Sharded training (``train.parallel="fsdp"``): FSDP2 over ``torchrun`` ranks.

Every block of the model and then the whole model go through
``torch.distributed.fsdp.fully_shard``: each rank keeps 1/N of every parameter, gradient and
optimizer state as a ``DTensor`` and gathers a block's full weights only while it runs (again
for its backward pass). The optimizer steps the shards; gradient clipping takes the global
norm over them.

A model whose fresh state holds its parameters (the meta-learned initial memories of Titans,
HOPE and the CMS, which reach the loss through the state) is sharded as one unit instead: the
model builds its blocks' fresh states before the blocks run, so per-block units would see
those parameters as inputs of the block and reduce-scatter its gradients before theirs arrive
(they were lost: 20 parameters of a 2-layer HOPE got no gradient). As one unit its weights are
gathered for the whole step and its gradients reduce-scattered once, at the end of the
backward pass; at rest parameters, gradients and optimizer states stay sharded. For the same
reason such a model does not train on streams here: the carried state of every step passes
gradients to the initial memories (``carried_state.reset_rows``), from outside the forward
pass; it is refused.

Checkpoints keep the folder of :mod:`nestlearn.training.checkpoint` and add ``sharded/``:
the model and optimizer state written by ``torch.distributed.checkpoint`` (one ``.distcp``
file per rank and ``.metadata``). Every rank writes its shard into the same staging folder,
which rank 0 completes (the whole model gathered to its CPU as ``model.safetensors``, so
``from_pretrained``, ``eval`` and ``generate`` read it as any other; ``state.safetensors``;
``checkpoint.json`` with the checksum of every file) and renames into place. The run folder
must therefore be on a filesystem every rank sees.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nestlearn.atomic import (
    STAGING_PREFIX,
    publish_directory,
    remove_staging_leftovers,
)
from nestlearn.errors import NestlearnError
from nestlearn.models.io import CONFIG_FILE as MODEL_CONFIG_FILE
from nestlearn.models.io import WEIGHTS_FILE as MODEL_FILE
from nestlearn.models.io import write_model_files
from nestlearn.state import tensors
from nestlearn.training import checkpoint as ckpt
from nestlearn.training.distributed import DistContext, any_rank, barrier, gather_objects
from nestlearn.training.grad_norm import clip_finite_gradients
from nestlearn.training.nonfinite import first_nonfinite
from nestlearn.treeio import flatten

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint folder inside a checkpoint
SHARDED_OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


def check_sharding(config: Any, ctx: DistContext, teach_signal: bool,
                   holds_parameters: bool) -> None:
    """Refuse what FSDP cannot run: one process, the CMS LM teach signal (its driver calls
    the model outside FSDP's hooks and rewrites gradients by hand), ``optim.levels``
    (``MultiFrequency`` keeps its own gradient sums, which ``torch.distributed.checkpoint``
    cannot shard), the matrix optimizers (their updates are written for whole matrices, not
    for ``DTensor`` shards, and are not tested on them) and stream training of a model whose
    state holds parameters."""
    if ctx.world_size < 2:
        raise NestlearnError(
            "train.parallel: got 'fsdp' in a single process; allowed: 'ddp' (the default) for "
            "one process, 'fsdp' under torchrun with 2 or more processes")
    if teach_signal:
        raise NestlearnError(
            "train.parallel: got 'fsdp' with CMS layers driven by the LM teach signal "
            "(model teach_signal='lm'); allowed: train.parallel='ddp' for this model")
    if config.optim.levels:
        raise NestlearnError(
            f"train.parallel: got 'fsdp' with optim.levels={list(config.optim.levels)}; "
            "allowed: train.parallel='ddp' with multi-frequency levels, or no optim.levels")
    if config.optim.name not in SHARDED_OPTIMIZERS:
        raise NestlearnError(
            f"train.parallel: got 'fsdp' with optim.name={config.optim.name!r}; allowed: "
            f"{', '.join(SHARDED_OPTIMIZERS)} (or train.parallel='ddp' for {config.optim.name})")
    if holds_parameters and config.data.sampling == "stream":
        raise NestlearnError(
            f"train.parallel: got 'fsdp' with data.sampling='stream' and a {config.model.arch} "
            "model (its fresh state holds parameters, which the carried state passes "
            "gradients to); allowed: data.sampling='windows', or train.parallel='ddp'")


def state_holds_parameters(model: nn.Module) -> bool:
    """True when a fresh state of ``model`` shares storage with one of its parameters."""
    init_state = getattr(model, "init_state", None)
    if not callable(init_state):
        return False
    owned = {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()}
    with torch.no_grad():
        state = init_state(1)
    return any(t.untyped_storage().data_ptr() in owned for t in tensors(state) if t.numel())


def shard_model(model: nn.Module, ctx: DistContext, whole: bool) -> None:
    """``fully_shard`` every block (the modules of each ``blocks`` list), then the model, on a
    1-D mesh of all ranks; ``whole``: the model alone, as one unit (see the module
    docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when a unit returns a view (an in-place change of it would skip a hook);
    # the trainer never changes a model's outputs in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view",
                            category=UserWarning)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    if not whole:
        for name, module in model.named_modules():
            if name.rpartition(".")[2] == "blocks" and isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shard of every gradient, by parameter name."""
    from torch.distributed.tensor import DTensor

    return {name: p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            for name, p in model.named_parameters() if p.grad is not None}


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``value`` (a replicated ``DTensor`` such as the clipped norm)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def clip_finite_sharded_gradients(model: nn.Module, max_norm: float, ctx: DistContext
                                  ) -> tuple[float, str | None]:
    """``clip_finite_gradients`` for a sharded model (all ranks call it, all get the same
    answer): the global norm over every rank's shards first (one all-reduce; the clip then
    scales the shards by that plain norm, no further collective), then the same rule. A
    non-finite norm names the first bad shard of the lowest rank that has one, or
    ``NORM_OVERFLOW`` when every shard is finite; no gradient is changed then."""

    def first_bad_shard() -> str | None:
        found = first_nonfinite(local_gradients(model))  # this rank's shards
        named = next((name for name in gather_objects(found, ctx) if name), None)
        return None if named is None else f"gradient of {named}"

    # the local shards' norm is a partial DTensor: full_value all-reduces it into a plain
    # tensor, which scales every shard without another collective
    return clip_finite_gradients(model, max_norm, reduce=full_value, find_bad=first_bad_shard)


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on rank 0's CPU (other ranks get an empty dict); all ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def save_sharded_checkpoint(run_dir: Path, ctx: DistContext, *, step: int,
                            config: dict[str, Any], model: nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler_state: dict[str, Any],
                            sampler_state: Any, rng_state: dict[str, Any],
                            extra: dict[str, Any], keep: int | None,
                            carried_state: Any = None) -> Path | None:
    """Write a checkpoint of a sharded run atomically (all ranks call it; rank 0 returns the
    folder, the others None)."""
    import torch.distributed.checkpoint as dcp

    final = ckpt.checkpoint_dir(run_dir, step)
    staging: list[str | None] = [None]
    failure: str | None = None
    if ctx.is_main:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_staging_leftovers(final.parent)
            staging[0] = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}-",
                                          dir=final.parent)
        except OSError as err:
            failure = f"{err.strerror or err}"
    dist.broadcast_object_list(staging, src=0)
    if staging[0] is None:
        raise OSError(f"checkpoint {final}: cannot create its staging folder ({failure or ''})")
    tmp = Path(staging[0])
    try:
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDED_DIR))
        full = _full_model_state(model)
        if ctx.is_main:
            _complete(tmp, model, full, step=step, config=config, world_size=ctx.world_size,
                      scheduler_state=scheduler_state, sampler_state=sampler_state,
                      rng_state=rng_state, extra=extra, carried_state=carried_state)
            publish_directory(tmp, final)
            if keep is not None:
                for stale in ckpt.list_checkpoints(run_dir)[:-keep]:
                    shutil.rmtree(stale)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(ctx)
    return final if ctx.is_main else None


def _complete(tmp: Path, model: nn.Module, full: dict[str, torch.Tensor], *, step: int,
              config: dict[str, Any], world_size: int, scheduler_state: dict[str, Any],
              sampler_state: Any, rng_state: dict[str, Any], extra: dict[str, Any],
              carried_state: Any) -> None:
    """Rank 0's part of a sharded checkpoint: the whole model, the small state, the manifest."""
    from safetensors.torch import save_file

    write_model_files(model, tmp, state=full)
    sampler_skeleton, sampler_tensors = flatten(sampler_state, "sampler/")
    rng_skeleton, rng_tensors = flatten(rng_state, "rng/")
    carried_skeleton, carried_tensors = flatten(carried_state, "carried/")
    save_file({**sampler_tensors, **rng_tensors, **carried_tensors}, str(tmp / ckpt.STATE_FILE))
    payload: dict[str, Any] = {
        "step": step,
        "config": config,
        "optimizer": {"sharded": SHARDED_DIR},
        "scheduler": scheduler_state,
        "sampler": sampler_skeleton,
        "rng": rng_skeleton,
        "extra": extra,
        "sharded": {"folder": SHARDED_DIR, "world_size": world_size},
    }
    if carried_state is not None:
        payload["carried"] = carried_skeleton
    names = [MODEL_FILE, MODEL_CONFIG_FILE, ckpt.STATE_FILE]
    names += sorted(f"{SHARDED_DIR}/{f.name}" for f in (tmp / SHARDED_DIR).iterdir()
                    if f.is_file())
    ckpt.write_manifest(tmp, payload, names)


def _read_metadata(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path / SHARDED_DIR)).read_metadata()
    except Exception as err:  # torch raises several kinds for a damaged .metadata
        raise NestlearnError(f"checkpoint {path}: refused, {SHARDED_DIR}/.metadata cannot be "
                             f"read ({type(err).__name__})") from None


def read_sharded_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of the tensors in a checkpoint's ``sharded/`` folder."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key: (tuple(item.size), item.properties.dtype)
            for key, item in _read_metadata(path).state_dict_metadata.items()
            if isinstance(item, TensorStorageMetadata)}


def check_sharded_model(checkpoint: ckpt.Checkpoint, model: nn.Module) -> None:
    """Refuse (before loading anything) a sharded checkpoint whose model tensors do not match
    ``model``'s names, full shapes and dtypes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    saved = {key[len("model."):]: value
             for key, value in read_sharded_metadata(checkpoint.path).items()
             if key.startswith("model.")}
    expected = {name: (tuple(t.shape), t.dtype) for name, t in get_model_state_dict(model).items()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        parts = [f"missing tensors {missing[:3]}"] if missing else []
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:3]}")
        raise NestlearnError(f"checkpoint {checkpoint.path}: refused, model does not match: "
                             + "; ".join(parts))
    for name, (shape, dtype) in expected.items():
        if saved[name] != (shape, dtype):
            raise NestlearnError(
                f"checkpoint {checkpoint.path}: refused, model tensor {name}: got "
                f"{saved[name][0]} {saved[name][1]}; allowed: {shape} {dtype}")


def load_sharded_state(checkpoint: ckpt.Checkpoint, model: nn.Module,
                       optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
    """Load the model and optimizer shards of ``checkpoint`` into the sharded ``model`` and
    its ``optimizer`` (all ranks; ``torch.distributed.checkpoint`` reshards when the run
    was saved by another number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # get_state_dict gives every parameter an optimizer state (a step with zero gradients at
    # lr 0); a parameter that had none when saved (it never got a gradient) keeps none
    state = _sharded_state(model, optimizer)
    prefix = "optimizer.state."
    saved = {key[len(prefix):].rpartition(".")[0]
             for key in _read_metadata(checkpoint.path).state_dict_metadata
             if key.startswith(prefix)}
    for name in [name for name in state["optimizer"]["state"] if name not in saved]:
        del state["optimizer"]["state"][name]
    failure: str | None = None
    try:
        dcp.load(state, checkpoint_id=str(checkpoint.path / SHARDED_DIR))
    except Exception as err:  # torch's CheckpointException wraps any cause
        failure = str(err).splitlines()[0] if str(err) else type(err).__name__
    if any_rank(failure is not None, ctx):
        raise NestlearnError(f"checkpoint {checkpoint.path}: refused, its sharded state cannot "
                             f"be loaded ({failure or 'on another rank'}); allowed: a "
                             "checkpoint of the same model and optimizer")
    # not strict: the parameters without a saved optimizer state (the model's names, shapes
    # and dtypes were checked before, by check_sharded_model)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
