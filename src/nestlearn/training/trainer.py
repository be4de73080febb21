"""The training loop: from a ``RunConfig`` to a trained, evaluated, checkpointed model.

:class:`Trainer` builds a run from :mod:`nestlearn.training.builders` (data, model, optimizer,
schedule) after locking the run folder (:mod:`nestlearn.training.run_lock`, held until
:meth:`Trainer.run` ends), refuses a step that cannot fit in memory
(:mod:`nestlearn.training.memory_budget`), restores the latest checkpoint on ``resume=True``, and
:meth:`Trainer.run` loops: batch -> forward -> NaN/Inf guard -> backward -> clip -> optimizer
step -> hooks (metrics, evaluation, checkpoints: :mod:`nestlearn.training.hooks`). A resumed
run's losses equal an uninterrupted run's (same seed, CPU). The run folder is described in
this package's README.

``data.sampling="stream"`` reads each batch row's documents in order
(:class:`nestlearn.data.streams.StreamSampler`) and carries the model's detached state into
the next step (truncated backprop through time), resetting rows by ``train.state_reset``
(:mod:`nestlearn.training.carried_state`); the carried state is checkpointed with the rest.
A model with CMS layers driven by the LM teach signal (``teach_signal="lm"``) runs its forward
through :func:`nestlearn.nn.teach_signal.stream_with_teach_signal`, so its levels learn.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from nestlearn.atomic import atomic_write_text
from nestlearn.errors import NestlearnError, NonFiniteError, invalid
from nestlearn.evaluate.perplexity import EvalResult, evaluate_batches, tokens_per_byte
from nestlearn.losses import lm_loss_sum, scored_targets
from nestlearn.models.teaching import uses_lm_teach_signal
from nestlearn.nn.teach_signal import stream_with_teach_signal
from nestlearn.state import to
from nestlearn.training import checkpoint as ckpt
from nestlearn.training.builders import (
    autocast_context,
    build_data,
    build_optimizer,
    build_run_model,
    build_scheduler,
    resolve_config,
    seed_everything,
)
from nestlearn.training.carried_state import (
    carried_form,
    reset_rows,
    state_to_tree,
    tree_from_state_tree,
)
from nestlearn.training.cuda_graph import GraphedBackward
from nestlearn.training.distributed import (
    DistContext,
    all_reduce_sum,
    any_rank,
    average_gradients,
    barrier,
    gather_objects,
    init_distributed,
    shutdown,
    wrap_for_training,
)
from nestlearn.training.failures import (
    as_resource_error,
    folder_before,
    remove_created_folders,
    remove_what_a_run_made,
)
from nestlearn.training.grad_norm import clip_finite_gradients
from nestlearn.training.hooks import Hook, StepRecord, StopSignals, TrainResult, default_hooks
from nestlearn.training.memory_budget import check_step_memory
from nestlearn.training.metrics_log import MetricsLogger
from nestlearn.training.nonfinite import NonFiniteGuard, find_nonfinite
from nestlearn.training.run_folder import (
    CONFIG_FILE,
    RunAlreadyComplete,
    check_resume_config,
    ensure_writable,
)
from nestlearn.training.run_lock import LOCK_FILE, RunFolderLock
from nestlearn.training.runconfig import (
    DataConfig,
    RunConfig,
    TrainConfig,
    check_cuda_graph,
    reset_interval,
)
from nestlearn.training.sharded import (
    check_sharded_model,
    check_sharding,
    clip_finite_sharded_gradients,
    load_sharded_state,
    save_sharded_checkpoint,
    shard_model,
    state_holds_parameters,
)
from nestlearn.training.wandb_sink import WandbSink

EVAL_SEED = 1_000_003  # fixed windows for periodic evaluation, independent of train.seed


class Trainer:
    """Builds everything a run needs; :meth:`run` trains.

    Attributes tests may inspect or wrap: ``model`` (not wrapped by DDP; sharded in place
    under ``train.parallel="fsdp"``), ``optimizer``, ``scheduler``, ``sampler``, ``config``
    (resolved), ``run_dir``, ``step``, ``hooks``, ``lock`` (the run folder's lock, taken on
    rank 0 when built and released when :meth:`run` ends).
    """

    def __init__(self, config: RunConfig, *, resume: bool = False, progress: bool = True,
                 ctx: DistContext | None = None) -> None:
        check_cuda_graph(config)
        self.ctx = ctx or init_distributed(config.train.device)
        self.run_dir = Path(config.train.out_dir).expanduser()
        self.stop_requested: str | None = None
        self.lock = RunFolderLock(self.run_dir)
        before = folder_before(self.run_dir) if self.ctx.is_main else None
        try:
            self._lock_run_folder()
        except BaseException:
            if before is not None:  # the folder may be another run's: only remove it if empty
                remove_created_folders(self.run_dir, before)
            raise
        try:
            checkpoint = self._open_run_folder(config, resume)
            self._build(config, checkpoint, progress)
        except BaseException:
            # a run refused before its first step leaves nothing it made behind: its files go
            # while it holds the lock, the folders it created once they are empty
            if before is not None:
                remove_what_a_run_made(self.run_dir, before, keep=LOCK_FILE)
            self.lock.release()
            if before is not None:
                remove_created_folders(self.run_dir, before)
            raise

    def _build(self, config: RunConfig, checkpoint: ckpt.Checkpoint | None, progress: bool
               ) -> None:
        """Data, model, optimizer, schedule, sampler, restored state, metrics and hooks."""
        resume = checkpoint is not None
        self.data = build_data(config, self.run_dir, self.ctx, reuse=resume)
        self.config = resolve_config(config, self.data)
        if checkpoint is not None:
            check_resume_config(_with_new_defaults(checkpoint.config), self.config,
                                checkpoint.path)
            if checkpoint.step >= self.config.train.steps:
                raise RunAlreadyComplete(self.run_dir, checkpoint.step,
                                         self.config.train.steps, checkpoint.path)

        seed_everything(self.config.train.seed)
        self.sharded = self.config.train.parallel == "fsdp"
        self.stream = self.config.data.sampling == "stream"
        # sharded: FSDP moves each block to the device as it shards it, so the whole model
        # is built in host memory only
        self.model = build_run_model(self.config, torch.device("cpu") if self.sharded
                                     else self.ctx.device)
        self.teach_signal = uses_lm_teach_signal(self.model)
        # sharded: True when the model is one unit, gathered for the whole step (sharded.py)
        self.whole_unit = False
        if self.sharded:
            self.whole_unit = state_holds_parameters(self.model)
            check_sharding(self.config, self.ctx, self.teach_signal, self.whole_unit)
            shard_model(self.model, self.ctx, whole=self.whole_unit)
        self.optimizer = build_optimizer(self.config.optim, self.model, self.config.train.seed)
        self.scheduler = build_scheduler(self.config, self.optimizer)
        self._check_memory()
        self._check_modes()
        self.sampler = self._make_sampler()
        # stream training: the detached state the next step starts from (None: fresh)
        self.carried: Any = None
        self.step = 0
        self.eval_steps: set[int] = set()
        self.tokens_seen = 0
        self.elapsed = 0.0
        if checkpoint is not None:
            self._restore(checkpoint)
        # the teach-signal driver calls the model itself: its gradients are averaged by hand;
        # a sharded model is its own wrapper
        self.ddp_model = self.model if self.teach_signal or self.sharded else wrap_for_training(
            self.model, self.ctx, self.config.data.seq_len,
            self.config.train.find_unused_parameters)
        self.autocast = autocast_context(self.config, self.ctx.device)
        self.graphed = self._graphed_step() if self.config.train.cuda_graph else None
        self.guard = NonFiniteGuard(self.save, self.run_dir / "checkpoints")
        self.metrics = MetricsLogger(self.run_dir, enabled=self.ctx.is_main,
                                     wandb=self._wandb_sink())
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / CONFIG_FILE, self.config.to_json())
            if checkpoint is None:
                self.metrics.start_fresh()
            else:
                self.metrics.resume_at(self.step)
        self.result = TrainResult(run_dir=self.run_dir, step=self.step, status="completed",
                                  rank=self.ctx.rank)
        self.hooks: list[Hook] = default_hooks(self, progress)

    def _wandb_sink(self) -> WandbSink | None:
        """The W&B sink when ``train.wandb_project`` is set (rank 0 only: it logs the rows)."""
        cfg = self.config.train
        if cfg.wandb_project is None or not self.ctx.is_main:
            return None
        return WandbSink(self.run_dir, cfg.wandb_project, cfg.wandb_mode, self.config.to_dict())

    def _check_memory(self) -> None:
        """Refuse a step that cannot fit in memory, before the first one (every rank checks
        its share of the batch; one refusal stops all)."""
        if not self.config.train.memory_check:
            return
        failure: NestlearnError | None = None
        try:
            check_step_memory(self.model, self.config.optim.name,
                              self.config.data.batch_size // self.ctx.world_size,
                              self.config.data.seq_len,
                              autocast_context(self.config, self.ctx.device))
        except NestlearnError as err:
            failure = err
        if any_rank(failure is not None, self.ctx):
            raise failure or NestlearnError("train.memory_check: another rank's step cannot "
                                            "fit in its memory (see its message)")

    def _make_sampler(self) -> Any:
        from nestlearn.data.streams import StreamSampler
        from nestlearn.data.tokens import WindowSampler

        kind = StreamSampler if self.stream else WindowSampler
        return kind(self.data.train_file, self.config.data.seq_len, self.config.data.batch_size,
                    seed=self.config.train.seed, rank=self.ctx.rank,
                    world_size=self.ctx.world_size)

    def _check_modes(self) -> None:
        """Refuse combinations of sampling, state reset and teach signal that cannot run."""
        if not self.stream and self.config.train.state_reset != "document":
            raise NestlearnError(
                f"train.state_reset: got {self.config.train.state_reset!r}; allowed: the "
                "default 'document' with data.sampling='windows' (every window starts from a "
                "fresh state), or data.sampling='stream'")
        if self.stream and self.config.train.state_reset != "never":
            # one probe segment: a carried state whose rows cannot be reset fails here, at once
            with torch.no_grad():
                ids = torch.zeros(1, self.config.data.seq_len, dtype=torch.long,
                                  device=self.ctx.device)
                _, state = self.model(ids)
                reset_rows(carried_form(state), lambda batch: self.model.init_state(batch,
                                                                     device=self.ctx.device),
                           torch.ones(1, dtype=torch.bool, device=self.ctx.device))

    def _lock_run_folder(self) -> None:
        """Create the run folder and take its lock on rank 0 (the one writer), before anything
        is written there; held until :meth:`run` ends. A refusal stops every rank."""
        failure: NestlearnError | None = None
        if self.ctx.is_main:
            try:
                ensure_writable(self.run_dir)
                self.lock.acquire()
            except NestlearnError as err:
                failure = err
        if any_rank(failure is not None, self.ctx):
            raise failure or NestlearnError(f"run folder {str(self.run_dir)!r}: rank 0 could "
                                            "not open it (see rank 0's message)")

    def _open_run_folder(self, config: RunConfig, resume: bool) -> ckpt.Checkpoint | None:
        """Check the run folder and the batch split; the checkpoint to resume from, if any."""
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
        return checkpoint

    # -- checkpoints --

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Apply a verified checkpoint; everything is checked before anything is loaded."""
        if self.sharded:
            check_sharded_model(checkpoint, self.model)
        else:
            ckpt.check_model_tensors(checkpoint, self.model)
            ckpt.check_optimizer_state(checkpoint, self.optimizer)
        try:
            self._make_sampler().load_state_dict(checkpoint.sampler)
        except NestlearnError as err:
            raise NestlearnError(f"checkpoint {checkpoint.path}: refused, {err}") from None
        carried = self._restored_carried(checkpoint)
        if self.sharded:
            load_sharded_state(checkpoint, self.model, self.optimizer, self.ctx)
        else:
            self.model.load_state_dict(checkpoint.model)
            self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self.sampler.load_state_dict(checkpoint.sampler)
        ckpt.restore_rng(checkpoint.rng)
        self.carried = carried
        self.step = checkpoint.step
        self.tokens_seen = int(checkpoint.extra.get("tokens", 0))
        self.elapsed = float(checkpoint.extra.get("elapsed_s", 0.0))

    def _restored_carried(self, checkpoint: ckpt.Checkpoint) -> Any:
        """This rank's carried state from ``checkpoint`` (stream training), checked."""
        if not self.stream:
            return None
        saved = checkpoint.carried
        if not isinstance(saved, list) or len(saved) != self.ctx.world_size:
            got = len(saved) if isinstance(saved, list) else "no"
            raise NestlearnError(
                f"checkpoint {checkpoint.path}: refused, it holds {got} carried stream states; "
                f"allowed: one per process ({self.ctx.world_size}; resume a stream run with "
                "the number of processes it was saved with)")
        state = tree_from_state_tree(saved[self.ctx.rank])
        if state is not None:
            state = to(state, device=self.ctx.device)
            fingerprint = getattr(state, "fingerprint", None)
            if fingerprint != self.model.fingerprint:
                raise NestlearnError(f"checkpoint {checkpoint.path}: refused, its carried state "
                                     "belongs to another model config")
        return state

    def _carried_trees(self) -> list[Any] | None:
        """Every rank's carried state as a plain tree (on rank 0; all ranks take part)."""
        if not self.stream:
            return None
        tree = None if self.carried is None else state_to_tree(to(self.carried, "cpu"))
        return gather_objects(tree, self.ctx)

    def save(self, sampler_state: Any = None, rng_state: Any = None) -> Path | None:
        """Checkpoint the current step on rank 0 (all ranks wait for it)."""
        path = None
        carried = self._carried_trees()
        if self.sharded:
            return save_sharded_checkpoint(
                self.run_dir, self.ctx, step=self.step, config=self.config.to_dict(),
                model=self.model, optimizer=self.optimizer,
                scheduler_state=self.scheduler.state_dict(),
                sampler_state=sampler_state if sampler_state is not None
                else self.sampler.state_dict(),
                rng_state=rng_state if rng_state is not None else ckpt.capture_rng(),
                extra={"tokens": self.tokens_seen, "elapsed_s": self.elapsed},
                keep=self.config.train.keep_checkpoints, carried_state=carried)
        if self.ctx.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir, step=self.step, config=self.config.to_dict(),
                model=self.model,
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                sampler_state=sampler_state if sampler_state is not None
                else self.sampler.state_dict(),
                rng_state=rng_state if rng_state is not None else ckpt.capture_rng(),
                extra={"tokens": self.tokens_seen, "elapsed_s": self.elapsed},
                keep=self.config.train.keep_checkpoints,
                carried_state=carried,
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

    def run_eval(self) -> None:
        """Evaluate on rank 0 (every rank runs a sharded model's forward passes), log the
        row and keep it in the result (all ranks wait)."""
        evaluation = self.evaluate() if self.ctx.is_main or self.sharded else None
        self.eval_steps.add(self.step)
        if evaluation is not None and self.ctx.is_main:
            self.metrics.log({"step": self.step, "split": "eval", **evaluation.to_dict()})
            self.result.evals[self.step] = evaluation.to_dict()
        barrier(self.ctx)

    # -- one step --

    def train_step(self) -> StepRecord:
        """One optimizer step: batch -> forward -> guard -> backward -> clip -> step."""
        start = time.perf_counter()
        # the last good state, saved by the guard if this step fails
        sampler_state, rng_state = self.sampler.state_dict(), ckpt.capture_rng()
        lr = self.scheduler.apply(self.step)
        batch = self.sampler.next_batch()
        inputs, targets = (t.to(self.ctx.device) for t in batch[:2])
        state = self._segment_state(batch[2]) if self.stream else None
        if self.graphed is not None:  # forward and backward replayed; no update yet
            loss_sum, failure = self.graphed(inputs, targets)[1], None
        else:
            loss_sum, failure, state = self._forward(inputs, targets, state)
        # one all-reduce per step: loss sum, scored targets, ranks that failed
        local = torch.stack([loss_sum.detach().double(), scored_targets(targets).double(),
                             torch.tensor(float(failure is not None), dtype=torch.float64,
                                          device=self.ctx.device)])
        total_sum, total_count, failed = all_reduce_sum(local, self.ctx).tolist()
        loss_value = total_sum / max(total_count, 1.0)
        if failure is None and failed == 0 and not math.isfinite(loss_value):
            failure = "the loss"
        if failed > 0 or failure is not None:
            # a failed forward (here or on another rank) leaves no loss to show
            failed_forward = failure is None or failure.startswith("the forward")
            self.guard.stop(self.step, failure or "another rank's forward pass or memory state",
                            None if failed_forward else loss_value, sampler_state, rng_state)
        if self.graphed is None:
            # DDP averages gradients over ranks: scaling by world / global count makes the
            # update that of the mean loss over the whole global batch.
            (loss_sum * (self.ctx.world_size / max(total_count, 1.0))).backward()
            if self.teach_signal:
                average_gradients(self.model, self.ctx)
        norm, bad_grad = self._clip_gradients()
        if bad_grad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.stop(self.step, bad_grad, loss_value, sampler_state, rng_state)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.stream:
            self.carried = carried_form(state)
        self.step += 1
        self.tokens_seen += int(total_count)
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        return StepRecord(step=self.step, loss=loss_value, grad_norm=norm, lr=lr,
                          tokens=int(total_count), seconds=seconds)

    def _segment_state(self, new_document: torch.Tensor) -> Any:
        """The state this step starts from: the carried one with rows reset by
        ``train.state_reset`` (None before the first step: the model's fresh state)."""
        if self.carried is None:
            return None
        policy = self.config.train.state_reset
        if policy == "document":
            reset = new_document
        else:
            every = reset_interval(policy)
            due = every is not None and self.step % every == 0
            reset = torch.full_like(new_document, due)
        device = self.ctx.device
        return reset_rows(self.carried,
                          lambda batch: self.model.init_state(batch, device=device),
                          reset.to(device))

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor, state: Any = None
                 ) -> tuple[torch.Tensor, str | None, Any]:
        """``(summed loss, where a NaN/Inf showed up or None, the model's new state)``."""
        try:
            with self.autocast:
                if self.teach_signal:
                    # the CMS levels learn from the LM loss (nestlearn.nn.teach_signal)
                    logits, state = stream_with_teach_signal(self.model, inputs, targets,
                                                             state)
                else:
                    logits, state = self.ddp_model(inputs, state)
            return (lm_loss_sum(logits, targets), find_nonfinite(state, "memory state"),
                    state)
        except NonFiniteError as err:
            # values went bad inside the model (e.g. a NaN gate under nestlearn.debug_checks);
            # stop as for a NaN loss, naming the place
            return (torch.zeros((), device=self.ctx.device), f"the forward pass ({err})",
                    None)

    def _graphed_step(self) -> GraphedBackward:
        """``train.cuda_graph``: the step's forward and backward (of the mean loss over the
        batch, as the eager step's) replayed from a CUDA graph; one process on a CUDA device
        (the rest is checked by ``check_cuda_graph`` when the Trainer is made)."""
        device, train = self.ctx.device, self.config.train
        if self.ctx.world_size > 1 or self.sharded:
            raise NestlearnError(
                f"train.cuda_graph: got true with {self.ctx.world_size} processes "
                f"(train.parallel={train.parallel!r}); allowed: one process, whose step "
                "holds no collective call")
        if device.type != "cuda":
            raise NestlearnError(
                f"train.cuda_graph: got true, but this run is on {device} (train.device="
                f"{train.device!r}); allowed: true on a CUDA device, false elsewhere")
        return GraphedBackward(self.graphed_loss, self.model.parameters())

    def graphed_loss(self, inputs: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a ``train.cuda_graph`` step captures: ``(the mean loss over the batch, whose
        backward it also captures, the summed loss)``; no check reads a value back here."""
        with autocast_context(self.config, self.ctx.device, cache_enabled=False):
            if self.teach_signal:
                logits, _ = stream_with_teach_signal(self.model, inputs, targets, None)
            else:
                logits, _ = self.model(inputs)
        loss_sum = lm_loss_sum(logits, targets)
        return loss_sum / scored_targets(targets).clamp(min=1), loss_sum.detach()

    def _clip_gradients(self) -> tuple[float, str | None]:
        """Clip the global gradient norm to ``train.grad_clip`` (0 = off) unless a gradient
        holds a NaN/Inf: ``(the norm before, None)``, or ``(norm, where)`` with nothing
        changed (the same answer on every rank; over every rank's shards when sharded)."""
        clip = self.config.train.grad_clip
        if self.sharded:
            return clip_finite_sharded_gradients(self.model, clip, self.ctx)
        # after DDP's all-reduce every rank holds the same gradients: a local check agrees
        return clip_finite_gradients(self.model, clip)

    # -- the loop --

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``train.steps`` (or ``stop_at``, as if interrupted there)."""
        result = self.result
        try:
            with StopSignals(self._stopped_at_once) as signals:
                while self.step < self.config.train.steps and self.stop_requested is None:
                    record = self.train_step()
                    result.losses[record.step] = record.loss
                    if any_rank(signals.received is not None, self.ctx):
                        self.stop_requested = signals.received or "another rank"
                    elif stop_at is not None and self.step >= stop_at:
                        self.stop_requested = "stop_at"
                    for hook in self.hooks:
                        hook.after_step(self, record)
            if self.stop_requested is not None:
                result.status = "interrupted"
            for hook in self.hooks:
                hook.at_end(self)
        except BaseException:
            self._close(quiet=True)
            raise
        self._close(quiet=False)
        result.step = self.step
        return result

    def _stopped_at_once(self, signal_name: str) -> str:
        """The line a second SIGINT/SIGTERM prints as it ends the process mid-step."""
        return (f"nestlearn: a second {signal_name}: stopped at once in step {self.step + 1}, "
                f"without saving; {ckpt.last_good(self.run_dir)}; continue with: nestlearn train "
                f"--out {self.run_dir} --resume")

    def _close(self, quiet: bool) -> None:
        """Close every hook, then release the lock. ``quiet`` (an error is on its way out)
        drops the hooks' own errors, so that a full disk failing the loss curve too does not
        hide the error that stopped the run."""
        try:
            for hook in self.hooks:
                try:
                    hook.close(self)
                except Exception:
                    if not quiet:
                        raise
        finally:
            self.lock.release()


def _with_new_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run config with the data and train fields added since it was written
    (``data.sampling``, ``train.state_reset``) at their defaults, which reproduce how it ran."""
    out = dict(saved)
    for section, cls in (("data", DataConfig), ("train", TrainConfig)):
        if isinstance(out.get(section), dict):
            defaults = {f.name: f.default for f in dataclasses.fields(cls)
                        if isinstance(f.default, (str, int, float, bool))}
            out[section] = {**defaults, **out[section]}
    return out


def train(config: RunConfig, *, resume: bool = False, progress: bool = True,
          stop_at: int | None = None) -> TrainResult:
    """Train ``config`` (``torchrun``-aware) and return what happened; resuming a run that
    already reached ``train.steps`` writes nothing and returns status ``"already_complete"``."""
    if not isinstance(config, RunConfig):
        raise invalid("config", type(config).__name__, "a RunConfig (e.g. from get_recipe)")
    ctx = init_distributed(config.train.device)
    trainer = None
    try:
        try:
            trainer = Trainer(config, resume=resume, progress=progress, ctx=ctx)
        except RunAlreadyComplete as done:
            return TrainResult(run_dir=Path(config.train.out_dir).expanduser(), step=done.step,
                               status="already_complete", checkpoint=done.checkpoint,
                               rank=ctx.rank, note=str(done))
        return trainer.run(stop_at=stop_at)
    except (OSError, RuntimeError, MemoryError, SafetensorError) as err:
        # a full disk, a folder gone read-only, memory run out: one line, last good checkpoint
        failure = as_resource_error(err, None if trainer is None else trainer.step,
                                    ckpt.last_good(Path(config.train.out_dir).expanduser()))
        if failure is None or failure is err:
            raise
        raise failure from None
    finally:
        shutdown(ctx)
