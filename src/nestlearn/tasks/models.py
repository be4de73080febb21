"""The tiny models the tasks train: one ``ModelConfig`` per arch, the same size for all.

Width 32, 2 blocks, 2 heads, SwiGLU hidden 64. The memory archs run their memories at chunk
16, not the layers' default 64: a memory reads at the state of its chunk start, so a query
whose key lies in the same chunk cannot be answered from the memory at all, and with chunk 64
most keys of a short task sequence would be in the query's chunk (MEMORY_LAYERS.md). The
``titans-mag`` sliding window is 32 tokens, so MQAR with more than 16 pairs and every needle
task need its memory branch. ``--set FIELD=VALUE`` changes any field (``memory.chunk_size=8``,
``dim=64``) of the archs that have it.
"""

from __future__ import annotations

from collections.abc import Sequence

from nestlearn.errors import NestlearnError
from nestlearn.models import ARCHS, ModelConfig
from nestlearn.training.runconfig import set_field

TASK_ARCHS: tuple[str, ...] = ("transformer", "titans", "titans-mag", "hope", "hope-attention")
MAG_WINDOW = 32
MEMORY_CHUNK = 16


def base_config(arch: str, vocab_size: int) -> ModelConfig:
    """The task model of ``arch`` before any ``--set``."""
    if arch not in ARCHS:
        raise NestlearnError(f"--archs: got {arch!r}; allowed: {', '.join(ARCHS)}")
    sections: dict[str, object] = {}
    if arch == "titans-mag":
        sections["attention"] = {"window": MAG_WINDOW}
    if arch in ("titans", "titans-mag"):
        sections["memory"] = {"chunk_size": MEMORY_CHUNK}
    if arch == "hope":
        sections["memory"] = {"chunk_size": MEMORY_CHUNK, "inner_chunk_size": MEMORY_CHUNK}
    return ModelConfig(arch=arch, vocab_size=vocab_size, dim=32, layers=2, heads=2,
                       mlp_hidden=64, **sections)


def task_model_configs(archs: Sequence[str], vocab_size: int, sets: Sequence[str] = ()
                       ) -> dict[str, ModelConfig]:
    """Each arch's config with the ``FIELD=VALUE`` assignments applied where the arch has the
    field (``memory.*`` skips the transformer); one that fits no arch is refused."""
    configs = {arch: base_config(arch, vocab_size) for arch in archs}
    for assignment in sets:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise NestlearnError(f"--set: got {assignment!r}; allowed: FIELD=VALUE, "
                                 "e.g. memory.chunk_size=8")
        if key.strip() in ("arch", "vocab_size"):
            raise NestlearnError(f"--set {assignment}: {key.strip()} is set by the task run "
                                 "(use --archs)")
        applied = 0
        for arch, config in configs.items():
            try:
                configs[arch] = set_field(config, key.strip(), value)
                applied += 1
            except NestlearnError as err:
                if "is not used by this config" not in str(err):
                    raise NestlearnError(f"--set {assignment}: {err}") from None
        if not applied:
            raise NestlearnError(f"--set {assignment}: no arch of {list(configs)} has "
                                 f"{key.strip().partition('.')[0]!r}")
    return configs
