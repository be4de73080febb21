"""One entry point from a config to a model."""

from __future__ import annotations

from nestlearn.errors import invalid
from nestlearn.models.classifier import SequenceClassifier
from nestlearn.models.config import ClassifierConfig, ModelConfig
from nestlearn.models.lm import CausalLM


def build_model(config: ModelConfig) -> CausalLM:
    """The causal LM described by ``config`` (freshly initialized, float32, on CPU)."""
    if not isinstance(config, ModelConfig):
        raise invalid("config", type(config).__name__, "a ModelConfig")
    return CausalLM(config)


def build_classifier(config: ClassifierConfig) -> SequenceClassifier:
    """The sequence classifier described by ``config``."""
    if not isinstance(config, ClassifierConfig):
        raise invalid("config", type(config).__name__, "a ClassifierConfig")
    return SequenceClassifier(config)
