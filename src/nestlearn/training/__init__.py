"""Training: run configs and recipes, the trainer (builders, loop, hooks), checkpoints,
several processes, and reading a trained run back. See README.md in this folder."""

from nestlearn.training.builders import build_data, build_optimizer, build_run_model
from nestlearn.training.hooks import CheckpointHook, EvalHook, Hook, LogHook, TrainResult
from nestlearn.training.nonfinite import NonFiniteError
from nestlearn.training.recipes import get_recipe, list_recipes
from nestlearn.training.run_folder import load_run_config, load_trained
from nestlearn.training.runconfig import RunConfig, apply_overrides
from nestlearn.training.trainer import Trainer, train

__all__ = [
    "CheckpointHook",
    "EvalHook",
    "Hook",
    "LogHook",
    "NonFiniteError",
    "RunConfig",
    "TrainResult",
    "Trainer",
    "apply_overrides",
    "build_data",
    "build_optimizer",
    "build_run_model",
    "get_recipe",
    "list_recipes",
    "load_run_config",
    "load_trained",
    "train",
]
