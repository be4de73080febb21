"""Recipes: plain functions returning a validated ``RunConfig``.

``tiny-*`` recipes train in minutes on a laptop CPU (byte tokenizer, Shakespeare);
``small-*`` and ``base-*`` are sized for one or several GPUs (BPE, bf16 autocast, longer
context). Any field can be changed afterwards with ``--set section.field=value``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nestlearn.errors import invalid
from nestlearn.training.runconfig import (
    DataConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)

# The archs that have recipes (the recipe name holds the arch: tiny-hope, small-titans, ...).
FAMILIES: tuple[str, ...] = ("transformer", "hope", "hope-attention", "titans")


@dataclass(frozen=True)
class Recipe:
    """A named run configuration: ``build()`` returns a fresh ``RunConfig``."""

    name: str
    description: str
    build: Callable[[], RunConfig]


def _model(arch: str, **fields: object) -> object:
    from nestlearn.models import ModelConfig

    return ModelConfig(arch=arch, **fields)


# Memory layers cost more per parameter on a CPU than attention, so the memory models are
# shallower; HOPE is the slowest per token, hence its smaller batch and fewer steps. Seconds
# per step measured on 2 shared cores: transformer 0.3, titans 0.3, hope-attention 0.4,
# hope (batch 8) 1.1-1.4.
TINY_SIZES: dict[str, dict[str, int]] = {
    "transformer": {"dim": 128, "layers": 4, "heads": 4},
    "hope": {"dim": 128, "layers": 2, "heads": 4},
    "hope-attention": {"dim": 64, "layers": 2, "heads": 4},
    "titans": {"dim": 64, "layers": 2, "heads": 4},
}
TINY_BATCH: dict[str, int] = {"hope": 8}
TINY_STEPS: dict[str, int] = {"hope": 300}

# data.sampling per family (all scales; default "windows"). Chosen by measurement at the tiny
# scale (docs/results/long-context.md): 300 steps of tiny-titans, seed 0, every validation
# scene read whole with the state carried: windows 2.458 nats/token, stream 2.106 (random
# windows from a fresh state: windows 2.061, stream 2.131). The CMS families keep windows:
# hope gains as much over whole documents (2.182 vs 2.724) but pays 0.155 on fresh windows,
# and hope-attention trains worse on streams (2.933 vs 2.119 on fresh windows).
SAMPLING: dict[str, str] = {"titans": "stream"}


def tiny(family: str) -> RunConfig:
    """CPU scale: 0.2-0.9M parameters, byte tokens, context 128, 300-600 steps."""
    steps = TINY_STEPS.get(family, 600)
    return RunConfig(
        name=f"tiny-{family}",
        model=_model(family, **TINY_SIZES[family]),
        data=DataConfig(corpus="shakespeare", tokenizer="byte", seq_len=128,
                        batch_size=TINY_BATCH.get(family, 16),
                        sampling=SAMPLING.get(family, "windows")),
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=50, min_lr_ratio=0.1),
        train=TrainConfig(steps=steps, eval_every=steps // 6, eval_iters=10,
                          checkpoint_every=steps // 6, log_every=10,
                          out_dir=f"runs/tiny-{family}"),
    )


def small(family: str) -> RunConfig:
    """One GPU: about 40M parameters, BPE 8k, context 1024, 20k steps, bf16 autocast."""
    return RunConfig(
        name=f"small-{family}",
        model=_model(family, dim=512, layers=8, heads=8, tie_embeddings=True),
        data=DataConfig(corpus="wiki", tokenizer="bpe", vocab_size=8192, seq_len=1024,
                        batch_size=32, sampling=SAMPLING.get(family, "windows")),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=1000, min_lr_ratio=0.1),
        train=TrainConfig(steps=20_000, eval_every=1000, eval_iters=50, checkpoint_every=1000,
                          log_every=50, out_dir=f"runs/small-{family}"),
    )


def base(family: str) -> RunConfig:
    """Several GPUs (torchrun): about 125M parameters, BPE 32k, context 2048, 100k steps."""
    return RunConfig(
        name=f"base-{family}",
        model=_model(family, dim=768, layers=12, heads=12),
        data=DataConfig(corpus="wiki", tokenizer="bpe", vocab_size=32_000, seq_len=2048,
                        batch_size=64, sampling=SAMPLING.get(family, "windows")),
        optim=OptimConfig(name="adamw", lr=6e-4, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=2000, min_lr_ratio=0.1),
        train=TrainConfig(steps=100_000, eval_every=2000, eval_iters=100,
                          checkpoint_every=2000, log_every=100,
                          out_dir=f"runs/base-{family}"),
    )


def _registry() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    for scale, build, where in ((tiny, tiny, "CPU, minutes"), (small, small, "1 GPU"),
                                (base, base, "GPUs, torchrun")):
        for family in FAMILIES:
            name = f"{scale.__name__}-{family}"
            recipes[name] = Recipe(
                name=name,
                description=f"{family} LM, {where}: {build.__doc__.split(':', 1)[1].strip()}",
                build=lambda build=build, family=family: build(family),
            )
    return recipes


def tiny_hope_paper() -> RunConfig:
    """tiny-hope with the self-modifying memory's `paper` preset (models/archs.py)."""
    import dataclasses

    from nestlearn.models.archs import PAPER_HOPE_MEMORY

    config = tiny("hope")
    return dataclasses.replace(
        config, name="tiny-hope-paper",
        model=_model("hope", **TINY_SIZES["hope"], memory=dict(PAPER_HOPE_MEMORY)),
        train=dataclasses.replace(config.train, out_dir="runs/tiny-hope-paper"))


RECIPES: dict[str, Recipe] = _registry()
RECIPES["tiny-hope-paper"] = Recipe(
    "tiny-hope-paper",
    "hope LM, CPU, minutes: tiny-hope with the memory following the paper's equations "
    "literally (nn/MEMORY_LAYERS.md, \"The paper preset\")",
    tiny_hope_paper)


def list_recipes() -> list[Recipe]:
    """All recipes, in registry order."""
    return list(RECIPES.values())


def get_recipe(name: str) -> RunConfig:
    """The run config of recipe ``name``; an unknown name lists the known ones."""
    if name not in RECIPES:
        raise invalid("--recipe", repr(name), ", ".join(RECIPES))
    return RECIPES[name].build()
