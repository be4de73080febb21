"""The training loop: from a ``RunConfig`` to a trained, evaluated, checkpointed model.

One step: draw this rank's rows of the global batch, forward (bf16 autocast on CUDA), check
the loss and every memory state for NaN/Inf, backward, check the gradients, clip, step the
optimizer at the scheduled learning rate. Every ``log_every`` steps a metrics row; every
``eval_every`` steps an evaluation (loss, perplexity, bits per byte); every
``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM a checkpoint
(:mod:`nestlearn.training.checkpoint`). ``resume=True`` continues from the latest checkpoint so that
the losses equal those of an uninterrupted run (same seed, CPU).

The run folder holds ``config.json``, ``tokenizer/``, ``data/`` (token files), ``checkpoints/``,
``metrics.jsonl``, ``metrics.csv``, ``loss_curve.png`` and ``model/`` (``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nestlearn.atomic import atomic_write_text
from nestlearn.errors import NestlearnError, invalid
from nestlearn.evaluate.perplexity import (
    IGNORE_INDEX,
    EvalResult,
    evaluate_batches,
    tokens_per_byte,
)
from nestlearn.training import checkpoint as ckpt
from nestlearn.training.distributed import (
    DistContext,
    all_reduce_sum,
    any_rank,
    barrier,
    init_distributed,
    shutdown,
    wrap_model,
)
from nestlearn.training.metrics_log import MetricsLogger, plot_loss_curve
from nestlearn.training.nonfinite import find_nonfinite, nonfinite_gradient
from nestlearn.training.runconfig import OptimConfig, RunConfig, diff
from nestlearn.training.schedule import WarmupCosine

CONFIG_FILE = "config.json"
# Fields a resumed run may change: they do not alter what the model computes or sees.
RESUMABLE_FIELDS: frozenset[str] = frozenset({
    "name", "train.steps", "train.eval_every", "train.eval_iters", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.device", "train.out_dir",
    "train.find_unused_parameters", "model.checkpoint_segment",
})
EVAL_SEED = 1_000_003  # fixed windows for periodic evaluation, independent of train.seed


class NonFiniteError(NestlearnError):
    """The loss, a memory state or a gradient became NaN/Inf; the run stopped."""


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    run_dir: Path
    step: int  # optimizer steps completed in total (including before a resume)
    status: str  # "completed" or "interrupted"
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, this call
    evals: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoint: Path | None = None
    rank: int = 0  # under torchrun, only rank 0 reports


@dataclass
class RunData:
    """Tokenizer and token files of a run."""

    tokenizer: Any
    train_file: Any
    eval_file: Any


# ---- building blocks ---------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and prove it is writable, or fail with one clear line."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise NestlearnError(
            f"train.out_dir: cannot write to {str(run_dir)!r} ({err.strerror or err})"
        ) from None


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


def build_optimizer(config: OptimConfig, model: nn.Module, seed: int = 0
                    ) -> torch.optim.Optimizer:
    """The optimizer named by ``config.name`` over ``model``'s parameters."""
    groups = param_groups(model, config.weight_decay)
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


def autocast_context(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``auto`` or ``bf16``), on CPU only when asked (``bf16``)."""
    mode = config.train.autocast
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _param_dtype(config: RunConfig) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[config.train.dtype]


def prepare_data(config: RunConfig, run_dir: Path, ctx: DistContext, reuse: bool) -> RunData:
    """Tokenizer and token files in ``run_dir`` (written by rank 0; reused on resume)."""
    from nestlearn.data.corpora import load_documents
    from nestlearn.data.tokenizers import build_tokenizer, load_tokenizer
    from nestlearn.data.tokens import TokenFile, write_token_file

    data = config.data
    tok_dir = run_dir / "tokenizer"
    data_dir = run_dir / "data"
    paths = {split: data_dir / split for split in {data.train_split, data.eval_split}}
    ready = reuse and (tok_dir / "tokenizer.json").exists() and all(
        p.with_suffix(".json").exists() for p in paths.values()
    )
    if ctx.is_main and not ready:
        train_docs = load_documents(data.corpus, data.train_split)
        if not train_docs:
            raise NestlearnError(
                f"data.corpus: {data.corpus!r} has no documents in split {data.train_split!r}"
            )
        tokenizer = build_tokenizer(data.tokenizer, train_docs, data.vocab_size)
        tokenizer.save(tok_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        for split, path in paths.items():
            docs = train_docs if split == data.train_split else load_documents(data.corpus, split)
            if not docs:
                raise NestlearnError(
                    f"data.corpus: {data.corpus!r} has no documents in split {split!r}"
                )
            write_token_file(path, docs, tokenizer)
    barrier(ctx)
    tokenizer = load_tokenizer(tok_dir)
    files = {split: TokenFile(path) for split, path in paths.items()}
    for token_file in files.values():
        token_file.check_tokenizer(tokenizer)
    return RunData(tokenizer, files[data.train_split], files[data.eval_split])


def resolve_config(config: RunConfig, tokenizer: Any) -> RunConfig:
    """The model's vocabulary is the tokenizer's: set ``model.vocab_size`` from it."""
    if config.model.vocab_size == tokenizer.vocab_size:
        return config
    model = dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size)
    return dataclasses.replace(config, model=model)


def check_resume_config(saved: dict[str, Any], current: RunConfig, where: Path) -> None:
    """Refuse to resume with a config that changes what the model computes or sees."""
    changed = [p for p in diff(saved, current.to_dict()) if p not in RESUMABLE_FIELDS]
    if changed:
        flat_saved = _flatten_dict(saved)
        flat_now = _flatten_dict(current.to_dict())
        shown = "; ".join(f"{p}: checkpoint {flat_saved.get(p)!r}, now {flat_now.get(p)!r}"
                          for p in changed[:3])
        raise NestlearnError(
            f"checkpoint {where}: refused, config mismatch ({shown}); only "
            f"{', '.join(sorted(RESUMABLE_FIELDS))} may change on --resume"
        )


def _flatten_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _LossView(nn.Module):
    """The model as DDP must see it: the memory state it returns is cut from the graph, so
    that DDP's search for unused parameters starts from the logits (the loss) only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        logits, state = self.model(ids)
        detach = getattr(state, "detach", None)
        return logits, detach() if callable(detach) else state


def unused_parameters(model: nn.Module, seq_len: int, device: torch.device) -> list[str]:
    """Names of trainable parameters that get no gradient from one probe forward/backward
    (e.g. parts of a memory unused by the LM loss); DDP must be told about them."""
    model.zero_grad(set_to_none=True)
    logits, _ = model(torch.zeros(1, seq_len, dtype=torch.long, device=device))
    logits.float().sum().backward()
    names = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return names


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked after each step (main thread only); a second
    signal interrupts at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop at once, without saving
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- the trainer -------------------------------------------------------------------------


class Trainer:
    """Builds everything a run needs; :meth:`run` trains.

    Attributes tests may inspect or wrap: ``model`` (unwrapped), ``optimizer``, ``scheduler``,
    ``sampler``, ``config`` (resolved), ``run_dir``, ``step``.
    """

    def __init__(self, config: RunConfig, *, resume: bool = False, progress: bool = True,
                 ctx: DistContext | None = None) -> None:
        self.ctx = ctx or init_distributed(config.train.device)
        self.run_dir = Path(config.train.out_dir).expanduser()
        self.progress = progress
        self.stop_requested: str | None = None
        if self.ctx.is_main:
            ensure_writable(self.run_dir)
        barrier(self.ctx)
        checkpoint = None
        if resume:
            if ckpt.latest_checkpoint(self.run_dir) is None:
                raise NestlearnError(f"--resume: {str(self.run_dir)!r} has no checkpoint")
            checkpoint = ckpt.load_checkpoint(self.run_dir)
        elif ckpt.latest_checkpoint(self.run_dir) is not None:
            raise NestlearnError(
                f"train.out_dir: {str(self.run_dir)!r} already holds checkpoints; "
                "allowed: --resume, or a new output folder"
            )
        if config.data.batch_size % self.ctx.world_size:
            raise NestlearnError(
                f"data.batch_size: got {config.data.batch_size}; allowed: a multiple of the "
                f"number of processes ({self.ctx.world_size})"
            )
        self.data = prepare_data(config, self.run_dir, self.ctx, reuse=resume)
        self.config = resolve_config(config, self.data.tokenizer)
        if checkpoint is not None:
            check_resume_config(checkpoint.config, self.config, checkpoint.path)

        from nestlearn.data.tokens import WindowSampler
        from nestlearn.models import build_model

        seed_everything(self.config.train.seed)
        self.model = build_model(self.config.model).to(self.ctx.device,
                                                       dtype=_param_dtype(self.config))
        self.optimizer = build_optimizer(self.config.optim, self.model, self.config.train.seed)
        sched = self.config.schedule
        self.scheduler = WarmupCosine(self.optimizer, sched.warmup_steps, self.config.train.steps,
                                      sched.kind, sched.min_lr_ratio)
        self.sampler = WindowSampler(self.data.train_file, self.config.data.seq_len,
                                     self.config.data.batch_size, seed=self.config.train.seed,
                                     rank=self.ctx.rank, world_size=self.ctx.world_size)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed = 0.0
        if checkpoint is not None:
            self._restore(checkpoint)
        find_unused = self.config.train.find_unused_parameters
        if self.ctx.enabled and not find_unused:
            find_unused = bool(unused_parameters(self.model, self.config.data.seq_len,
                                                 self.ctx.device))
        self.ddp_model = wrap_model(_LossView(self.model) if self.ctx.enabled else self.model,
                                    self.ctx, find_unused)
        self.autocast = autocast_context(self.config, self.ctx.device)
        self.metrics = MetricsLogger(self.run_dir, enabled=self.ctx.is_main)
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / CONFIG_FILE, self.config.to_json())
            if checkpoint is None:
                self.metrics.start_fresh()
            else:
                self.metrics.resume_at(self.step)

    # -- checkpoints --

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Apply a verified checkpoint; everything is checked before anything is loaded."""
        ckpt.check_model_tensors(checkpoint, self.model)
        ckpt.check_optimizer_state(checkpoint, self.optimizer)
        try:
            probe = type(self.sampler)(self.sampler.token_file, self.sampler.seq_len,
                                       self.sampler.batch_size, seed=self.sampler.seed,
                                       rank=self.sampler.rank,
                                       world_size=self.sampler.world_size)
            probe.load_state_dict(checkpoint.sampler)
        except NestlearnError as err:
            raise NestlearnError(f"checkpoint {checkpoint.path}: refused, {err}") from None
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.sampler.load_state_dict(checkpoint.sampler)
        ckpt.restore_rng(checkpoint.rng)
        self.step = checkpoint.step
        self.tokens_seen = int(checkpoint.extra.get("tokens", 0))
        self.elapsed = float(checkpoint.extra.get("elapsed_s", 0.0))

    def save(self, sampler_state: Any = None, rng_state: Any = None) -> Path | None:
        """Checkpoint the current step on rank 0 (all ranks wait for it)."""
        path = None
        if self.ctx.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir, step=self.step, config=self.config.to_dict(),
                model_state=self.model.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                sampler_state=sampler_state if sampler_state is not None
                else self.sampler.state_dict(),
                rng_state=rng_state if rng_state is not None else ckpt.capture_rng(),
                extra={"tokens": self.tokens_seen, "elapsed_s": self.elapsed},
                keep=self.config.train.keep_checkpoints,
            )
        barrier(self.ctx)
        return path

    # -- evaluation --

    def evaluate(self) -> EvalResult:
        """Periodic evaluation on fixed random windows of the eval split (rank 0's model)."""
        from nestlearn.data.tokens import WindowSampler

        data = self.config.data
        windows = WindowSampler(self.data.eval_file, data.seq_len, data.batch_size,
                                seed=EVAL_SEED)
        batches = (windows.next_batch() for _ in range(self.config.train.eval_iters))
        return evaluate_batches(self.model, batches, tokens_per_byte(self.data.eval_file),
                                self.ctx.device, autocast=self.autocast)

    def _run_eval(self, result: TrainResult) -> None:
        if self.ctx.is_main:
            evaluation = self.evaluate()
            record = {"step": self.step, "split": "eval", **evaluation.to_dict()}
            self.metrics.log(record)
            result.evals[self.step] = evaluation.to_dict()
        barrier(self.ctx)

    # -- one step --

    def _stop_nonfinite(self, where: str, loss: float | None, sampler_state: Any,
                        rng: Any) -> None:
        """Save the last good state (before this step) and raise naming the place."""
        saved = self.save(sampler_state, rng)
        shown = saved or (self.run_dir / "checkpoints")
        loss_part = "" if loss is None else f" (loss {loss:.6g})"
        raise NonFiniteError(
            f"training stopped at step {self.step + 1}: NaN/Inf in {where}{loss_part}; "
            f"last good checkpoint (step {self.step}) saved in {shown}"
        )

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step; returns (loss, grad norm, learning rate)."""
        sampler_state = self.sampler.state_dict()
        rng_state = ckpt.capture_rng()
        lr = self.scheduler.apply(self.step)
        inputs, targets = self.sampler.next_batch()
        inputs = inputs.to(self.ctx.device)
        targets = targets.to(self.ctx.device)
        failure = None
        try:
            with self.autocast:
                logits, state = self.ddp_model(inputs)
            loss_sum = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum",
            )
            failure = find_nonfinite(state, "memory state")
        except NestlearnError as err:
            # the inputs are valid token ids: a model error here means its values went bad
            # (e.g. an op refusing non-finite gates); stop as for a NaN, naming the place
            failure = f"the forward pass ({err})"
            loss_sum = torch.zeros((), device=self.ctx.device)
        # one all-reduce per step: loss sum, scored targets, ranks that failed
        local = torch.stack([loss_sum.detach().double(),
                             (targets != IGNORE_INDEX).sum().double(),
                             torch.tensor(float(failure is not None), dtype=torch.float64,
                                          device=self.ctx.device)])
        total_sum, total_count, failed = all_reduce_sum(local, self.ctx).tolist()
        loss_value = total_sum / max(total_count, 1.0)
        if failure is None and failed == 0 and not math.isfinite(loss_value):
            failure = "the loss"
        if failed > 0 or failure is not None:
            # a failed forward (here or on another rank) leaves no loss to show
            failed_forward = failure is None or failure.startswith("the forward")
            shown_loss = None if failed_forward else loss_value
            self._stop_nonfinite(failure or "another rank's forward pass or memory state",
                                 shown_loss, sampler_state, rng_state)
        # DDP averages gradients over ranks: scaling by world / global count makes the update
        # that of the mean loss over the whole global batch.
        loss = loss_sum * (self.ctx.world_size / max(total_count, 1.0))
        loss.backward()
        # after DDP's all-reduce every rank holds the same gradients: a local check agrees
        bad_grad = nonfinite_gradient(self.model)
        if bad_grad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self._stop_nonfinite(bad_grad, loss_value, sampler_state, rng_state)
        clip = self.config.train.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(total_count)
        return loss_value, float(norm), lr

    # -- the loop --

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``train.steps`` (or ``stop_at``, as if interrupted there)."""
        cfg = self.config.train
        result = TrainResult(run_dir=self.run_dir, step=self.step, status="completed",
                             rank=self.ctx.rank)
        bar = None
        if self.progress and self.ctx.is_main and self.step < cfg.steps:
            try:
                from tqdm import tqdm
            except ImportError:  # optional: metrics files carry the same numbers
                tqdm = None
            if tqdm is not None:
                bar = tqdm(total=cfg.steps, initial=self.step, desc=self.config.name,
                           unit="step", dynamic_ncols=True, file=sys.stderr)
        window_tokens, window_time = 0, 0.0  # training steps only: eval and saving excluded
        try:
            with _StopSignals() as signals:
                while self.step < cfg.steps:
                    start = time.perf_counter()
                    tokens_before = self.tokens_seen
                    loss, norm, lr = self.train_step()
                    duration = time.perf_counter() - start
                    self.elapsed += duration
                    window_time += duration
                    result.losses[self.step] = loss
                    window_tokens += self.tokens_seen - tokens_before
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        tps = window_tokens / max(window_time, 1e-9)
                        window_tokens, window_time = 0, 0.0
                        self.metrics.log({
                            "step": self.step, "split": "train", "loss": loss,
                            "ppl": math.exp(min(loss, 700.0)), "lr": lr, "grad_norm": norm,
                            "tokens_per_s": round(tps, 1), "tokens": self.tokens_seen,
                            "elapsed_s": round(self.elapsed, 3),
                        })
                        if bar is not None:
                            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}",
                                            lr=f"{lr:.2e}")
                    if bar is not None:
                        bar.update(1)
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._run_eval(result)
                    interrupted = any_rank(signals.received is not None, self.ctx)
                    if interrupted or (stop_at is not None and self.step >= stop_at):
                        result.status = "interrupted"
                        self.stop_requested = signals.received or "stop_at"
                        break
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        result.checkpoint = self.save()
        finally:
            if bar is not None:
                bar.close()
        if result.status == "completed" and self.step not in result.evals:
            self._run_eval(result)
        result.checkpoint = self.save()
        result.step = self.step
        if self.ctx.is_main:
            if result.status == "completed":
                from nestlearn.models import save_pretrained

                save_pretrained(self.model, self.run_dir / "model")
            plot_loss_curve(self.run_dir, self.config.name)
        self.metrics.close()
        return result


def train(config: RunConfig, *, resume: bool = False, progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
    """Train ``config`` (``torchrun``-aware) and return what happened."""
    if not isinstance(config, RunConfig):
        raise invalid("config", type(config).__name__, "a RunConfig (e.g. from get_recipe)")
    ctx = init_distributed(config.train.device)
    try:
        return Trainer(config, resume=resume, progress=progress, ctx=ctx).run(stop_at=stop_at)
    finally:
        shutdown(ctx)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run folder was trained with."""
    path = Path(run_dir).expanduser() / CONFIG_FILE
    if not path.exists():
        raise NestlearnError(f"run folder {str(run_dir)!r}: no {CONFIG_FILE} (not a training run)")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise NestlearnError(f"{path}: not valid JSON ({err})") from None


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, RunConfig, Any, int]:
    """``(model, config, tokenizer, step)`` from a run folder's latest checkpoint."""
    from nestlearn.data.tokenizers import load_tokenizer
    from nestlearn.models import build_model

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise NestlearnError(f"run folder {str(run_dir)!r} does not exist")
    checkpoint = ckpt.load_checkpoint(run_dir)
    config = RunConfig.from_dict(checkpoint.config)
    model = build_model(config.model).to(dtype=_param_dtype(config))
    ckpt.check_model_tensors(checkpoint, model)
    model.load_state_dict(checkpoint.model)
    model.to(device).eval()
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    return model, config, tokenizer, checkpoint.step
