"""A run folder: its config, the checks that guard it, and reading a trained model back.

``RUN/config.json`` is the resolved config; the model of a run is its latest checkpoint
(``checkpoints/step_XXXXXXXX/`` holds ``save_pretrained``'s two files beside the training
state, so ``from_pretrained`` loads it); the tokenizer and token files are the run's
``nestlearn data tokenize`` folder (``RUN/data`` or ``data.corpus``, see
:func:`nestlearn.training.builders.data_dir`).

Run folders written before this layout (tokenizer in ``RUN/tokenizer/``, token files of two
splits in ``RUN/data/``, checkpoints without the model's ``config.json``, a second copy of the
final weights in ``RUN/model/``) still load for evaluation and sampling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nestlearn.data.dataset import DATASET_FILE, open_dataset
from nestlearn.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer
from nestlearn.data.tokens import TokenFile
from nestlearn.errors import NestlearnError
from nestlearn.training import checkpoint as ckpt
from nestlearn.training.builders import data_dir, param_dtype
from nestlearn.training.run_checkpoint import readable_checkpoint
from nestlearn.training.runconfig import RunConfig, diff

CONFIG_FILE = "config.json"
LEGACY_TOKENIZER_DIR = "tokenizer"  # RUN/tokenizer/ of run folders from before RUN/data held it
# Fields a resumed run may change: they do not alter what the model computes or sees.
RESUMABLE_FIELDS: frozenset[str] = frozenset({
    "name", "train.steps", "train.eval_every", "train.eval_iters", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.device", "train.out_dir",
    "train.find_unused_parameters", "model.checkpoint_segment", "train.memory_check",
    "train.wandb_project", "train.wandb_mode", "train.cuda_graph",
})


class RunAlreadyComplete(NestlearnError):
    """A resume of a run whose latest checkpoint has reached ``train.steps``: raised before
    anything in the run folder is written, so the finished run stays as it was."""

    def __init__(self, run_dir: Path, step: int, steps: int, checkpoint: Path) -> None:
        super().__init__(f"{run_dir} is already complete at step {step} (train.steps={steps}); "
                         "nothing changed; raise train.steps to train further")
        self.step = step
        self.checkpoint = checkpoint


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


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run folder was trained with."""
    path = Path(run_dir).expanduser() / CONFIG_FILE
    if not path.exists():
        raise NestlearnError(f"run folder {str(run_dir)!r}: no {CONFIG_FILE} (not a training run)")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise NestlearnError(f"{path}: not valid JSON ({err})") from None


def load_run_tokenizer(run_dir: Path, config: RunConfig) -> Tokenizer:
    """The tokenizer of a run: its data folder's, or ``RUN/tokenizer/`` of an older run."""
    directory = data_dir(config, run_dir)
    if not (directory / TOKENIZER_FILE).is_file():
        legacy = run_dir / LEGACY_TOKENIZER_DIR
        if (legacy / TOKENIZER_FILE).is_file():
            return load_tokenizer(legacy)
    return load_tokenizer(directory)


def load_run_split(run_dir: Path, config: RunConfig, split: str, tokenizer: Tokenizer
                   ) -> TokenFile:
    """The token file of ``split`` of a run (checked against ``tokenizer``)."""
    directory = data_dir(config, run_dir)
    if (directory / DATASET_FILE).is_file():
        token_file = open_dataset(directory).splits[split]
    else:
        # an older run tokenized only its train and eval splits into RUN/data
        from nestlearn.data.corpora import load_documents
        from nestlearn.data.tokens import write_token_file

        path = run_dir / "data" / split
        if not path.with_suffix(".json").exists():
            write_token_file(path, load_documents(config.data.corpus, split), tokenizer)
        token_file = TokenFile(path)
    token_file.check_tokenizer(tokenizer)
    return token_file


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu",
                 checkpoint: str | Path | None = None
                 ) -> tuple[nn.Module, RunConfig, Tokenizer, int]:
    """``(model, config, tokenizer, step)`` of a run folder's latest checkpoint (the previous
    good one, with a warning line, when it is damaged) or of the checkpoint folder
    ``checkpoint``, the model loaded with
    ``nestlearn.models.from_pretrained`` (in eval mode, on ``device``)."""
    from nestlearn.models import from_pretrained

    run_dir = Path(run_dir).expanduser()
    if checkpoint is None:
        path, payload = readable_checkpoint(run_dir)
    else:
        if not run_dir.is_dir():
            raise NestlearnError(f"run folder {str(run_dir)!r} does not exist")
        path, payload = ckpt.read_manifest(Path(checkpoint))
    config = RunConfig.from_dict(payload["config"])
    if (path / ckpt.MODEL_CONFIG_FILE).is_file():
        model = from_pretrained(path)
    else:
        model = _load_legacy_checkpoint_model(path, config)
    model.to(device).eval()
    return model, config, load_run_tokenizer(run_dir, config), int(payload["step"])


def _load_legacy_checkpoint_model(path: Path, config: RunConfig) -> nn.Module:
    """The model of a checkpoint written before checkpoints held the model's config.json."""
    from nestlearn.models import build_model

    checkpoint = ckpt.load_checkpoint(path)
    model = build_model(config.model).to(dtype=param_dtype(config))
    ckpt.check_model_tensors(checkpoint, model)
    model.load_state_dict(checkpoint.model)
    return model
