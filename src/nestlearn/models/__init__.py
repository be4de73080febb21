"""Models: configs, causal LMs and classifiers over Transformer++, Titans and HOPE blocks."""

from nestlearn.models import archs  # noqa: F401  (fills the arch registry)
from nestlearn.models.build import build_classifier, build_model
from nestlearn.models.classifier import SequenceClassifier
from nestlearn.models.config import ARCHS, ArchSpec, ClassifierConfig, ModelConfig, register_arch
from nestlearn.models.generation import generate, sample_next, token_reader
from nestlearn.models.io import from_pretrained, save_pretrained
from nestlearn.models.lm import Backbone, CausalLM, check_ids
from nestlearn.models.stacking import hope_from_transformer
from nestlearn.models.state import LMState

__all__ = [
    "ARCHS",
    "ArchSpec",
    "Backbone",
    "CausalLM",
    "ClassifierConfig",
    "LMState",
    "ModelConfig",
    "SequenceClassifier",
    "build_classifier",
    "build_model",
    "check_ids",
    "from_pretrained",
    "generate",
    "hope_from_transformer",
    "register_arch",
    "sample_next",
    "save_pretrained",
    "token_reader",
]
