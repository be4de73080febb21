"""The pieces a run is built from, one function each: data, model, optimizer, schedule,
autocast. :class:`nestlearn.training.trainer.Trainer` calls them in this order."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nestlearn.data.dataset import DATASET_FILE, open_dataset, tokenize_corpus
from nestlearn.data.tokenizers import TOKENIZER_FILE, Tokenizer
from nestlearn.data.tokens import TokenFile
from nestlearn.errors import NestlearnError
from nestlearn.training.distributed import DistContext, barrier
from nestlearn.training.runconfig import OptimConfig, RunConfig
from nestlearn.training.schedule import WarmupCosine

RUN_DATA_DIR = "data"  # RUN/data: where a run tokenizes a corpus given as text


@dataclass
class RunData:
    """The tokenizer and the token files of a run, from a ``nestlearn data tokenize`` folder."""

    directory: Path
    tokenizer: Tokenizer
    train_file: TokenFile
    eval_file: TokenFile
    external: bool = False  # data.corpus is a tokenized folder (not RUN/data)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_dir(config: RunConfig, run_dir: Path) -> Path:
    """The ``nestlearn data tokenize`` folder a run reads: ``data.corpus`` itself when it is
    one (it holds ``dataset.json``), else ``RUN/data``, where the run tokenizes the corpus."""
    corpus = Path(config.data.corpus).expanduser()
    if (corpus / DATASET_FILE).is_file():
        return corpus
    return run_dir / RUN_DATA_DIR


def build_data(config: RunConfig, run_dir: Path, ctx: DistContext, reuse: bool) -> RunData:
    """Open the run's tokenized data, writing ``RUN/data`` first (rank 0) with the function
    behind ``nestlearn data tokenize`` when the corpus is text; ``reuse`` keeps a complete
    ``RUN/data`` (resume)."""
    data = config.data
    directory = data_dir(config, run_dir)
    own = directory == run_dir / RUN_DATA_DIR
    if ctx.is_main and own and not (reuse and (directory / DATASET_FILE).is_file()):
        vocab_size = data.vocab_size if data.tokenizer == "bpe" else None
        tokenize_corpus(data.corpus, directory, tokenizer=data.tokenizer, vocab_size=vocab_size)
    barrier(ctx)
    dataset = open_dataset(directory)
    for split in (data.train_split, data.eval_split):
        if dataset.splits[split].num_documents == 0:
            raise NestlearnError(
                f"data.corpus: {data.corpus!r} has no documents in split {split!r}"
            )
    return RunData(directory, dataset.tokenizer, dataset.splits[data.train_split],
                   dataset.splits[data.eval_split], external=not own)


def resolve_config(config: RunConfig, data: RunData) -> RunConfig:
    """The config with what the data decides filled in: ``model.vocab_size`` is the
    tokenizer's, and a run reading a tokenized folder takes its tokenizer kind (and BPE
    vocabulary) from it."""
    tokenizer = data.tokenizer
    data_config = config.data
    if data.external:
        kind = tokenizer.describe()["type"]
        vocab = tokenizer.vocab_size if kind == "bpe" else data_config.vocab_size
        if kind == "pretrained":  # data.tokenizer names the folder's copy of the file
            kind = str(data.directory / TOKENIZER_FILE)
        data_config = dataclasses.replace(data_config, tokenizer=kind, vocab_size=vocab)
    model = config.model
    if model.vocab_size != tokenizer.vocab_size:
        model = dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
    if model is config.model and data_config is config.data:
        return config
    return dataclasses.replace(config, model=model, data=data_config)


def param_dtype(config: RunConfig) -> torch.dtype:
    """The dtype of the run's parameters (``train.dtype``)."""
    return {"float32": torch.float32, "float64": torch.float64}[config.train.dtype]


def build_run_model(config: RunConfig, device: torch.device) -> nn.Module:
    """The model of ``config`` in the run's dtype on ``device`` (seed first for the same
    initial weights on every rank). ``train.compile`` switches the memory ops' compiled chunk
    step on for this process (``nestlearn.ops.set_compile``; false leaves the switch as it is,
    by default ``NESTLEARN_COMPILE``'s)."""
    from nestlearn.models import build_model
    from nestlearn.ops import set_compile

    if config.train.compile:
        set_compile(True)
    return build_model(config.model).to(device, dtype=param_dtype(config))


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; norms, biases and scalars get none."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def level_groups(model: nn.Module, groups: list[dict[str, Any]],
                 levels: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """``groups`` split by update period: a parameter whose name matches a glob pattern of
    ``levels`` gets that pattern's period, the others period 1. A pattern that matches no
    parameter, or a parameter matched by two patterns, is refused by name."""
    names = {id(param): name for name, param in model.named_parameters()}
    matched: dict[str, list[str]] = {pattern: [] for pattern, _ in levels}
    split = []
    for group in groups:
        by_period: dict[int, list[torch.Tensor]] = {}
        for param in group["params"]:
            name = names[id(param)]
            hits = [(pattern, period) for pattern, period in levels
                    if fnmatch.fnmatchcase(name, pattern)]
            if len(hits) > 1:
                raise NestlearnError(f"optim.levels: parameter {name!r} matches "
                                     f"{hits[0][0]!r} and {hits[1][0]!r}; allowed: one pattern "
                                     "per parameter")
            for pattern, _ in hits:
                matched[pattern].append(name)
            by_period.setdefault(hits[0][1] if hits else 1, []).append(param)
        split += [{**group, "params": params, "period": period}
                  for period, params in sorted(by_period.items())]
    for pattern, found in matched.items():
        if not found:
            example = next(iter(names.values()), "none")
            raise NestlearnError(f"optim.levels: pattern {pattern!r} matches no parameter; "
                                 f"allowed: glob patterns over parameter names (e.g. "
                                 f"{example!r})")
    return split


def build_optimizer(config: OptimConfig, model: nn.Module, seed: int = 0
                    ) -> torch.optim.Optimizer:
    """The optimizer named by ``config.name`` over ``model``'s parameters, wrapped in
    ``nestlearn.optim.MultiFrequency`` when ``config.levels`` gives update periods."""
    groups = param_groups(model, config.weight_decay)
    levels = config.level_periods()
    if not levels:
        return _base_optimizer(config, groups, seed)
    from nestlearn.optim import MultiFrequency

    return MultiFrequency(_base_optimizer(config, level_groups(model, groups, levels), seed))


def _base_optimizer(config: OptimConfig, groups: list[dict[str, Any]], seed: int
                    ) -> torch.optim.Optimizer:
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    from nestlearn import optim

    fallback = {"fallback_lr": config.fallback_lr, "fallback_betas": config.betas,
                "fallback_eps": config.eps}
    if config.name == "muon":
        return optim.Muon(groups, lr=config.lr, momentum=config.momentum, **fallback)
    if config.name == "m3":
        return optim.M3(groups, lr=config.lr, beta1=config.momentum, beta2=config.betas[1],
                        eps=config.eps, **fallback)
    if config.name == "delta-momentum":
        return optim.DeltaMomentum(groups, lr=config.lr, momentum=config.momentum,
                                   eps=config.eps, **fallback)
    if config.name == "preconditioned-momentum":
        return optim.PreconditionedMomentum(groups, lr=config.lr, momentum=config.momentum,
                                            beta2=config.betas[1], eps=config.eps, **fallback)
    if config.name == "deep-momentum":
        return optim.DeepMomentum(groups, lr=config.lr, momentum=config.momentum, seed=seed,
                                  **fallback)
    raise NestlearnError(f"optim.name: got {config.name!r}; allowed: a known optimizer")


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> WarmupCosine:
    """Linear warmup, then cosine (or constant) over ``train.steps``."""
    sched = config.schedule
    return WarmupCosine(optimizer, sched.warmup_steps, config.train.steps, sched.kind,
                        sched.min_lr_ratio)


def autocast_context(config: RunConfig, device: torch.device, cache_enabled: bool = True
                     ) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto`` or ``bf16``), on CPU only when asked (``bf16``).
    ``cache_enabled=False`` recasts the weights on every call, as a CUDA graph's replays
    must."""
    mode = config.train.autocast
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              cache_enabled=cache_enabled)
    return contextlib.nullcontext()
