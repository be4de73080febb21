"""Configs and model folders written by nestlearn 0.1 (flat model configs) still load.

The fixtures in ``fixtures/v0_1_format`` were written by the 0.1 release: model folders of
every arch (and a classifier) with the logits each produced on fixed ids, and a recipe's run
config. Loaded today they must build the same models: same parameters, same logits.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nestlearn.models import ModelConfig, from_pretrained
from nestlearn.models.migrate import FLAT_FIELDS, is_flat_model_dict
from nestlearn.training.recipes import get_recipe
from nestlearn.training.runconfig import RunConfig

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1_format"
MODELS = ["hope", "titans-mag", "hope-attention", "transformer", "titans", "classifier-titans"]


@pytest.mark.parametrize("name", MODELS)
def test_a_0_1_model_folder_loads_and_computes_the_same_logits(name):
    expected = load_file(FIXTURES / "expected_outputs.safetensors")
    model = from_pretrained(FIXTURES / name)
    saved = json.loads((FIXTURES / name / "config.json").read_text())["config"]
    assert is_flat_model_dict(saved.get("backbone", saved))
    with torch.no_grad():
        out = model(expected["ids"])
    logits = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(logits, expected[name], rtol=1e-5, atol=1e-6)


def test_migrated_sections_hold_the_0_1_options():
    saved = json.loads((FIXTURES / "hope" / "config.json").read_text())["config"]
    config = ModelConfig.from_dict(saved)
    assert config.memory.inner_chunk_size == 3 and config.memory.chunk_size == 4
    assert config.memory.eta_init == 0.3 and config.memory.dgd  # None meant on for hope
    # Defaults changed since 0.1 are pinned: v targets, one ceiling from the larger chunk.
    assert config.memory.memory_target == "v"
    assert config.memory.eta_max == 1.0 * (1 - 0.9) / (4 * 4)
    assert config.cms.variant == "nested" and config.cms.chunk_sizes == (2, 6)
    assert config.cms.chunk_step is None
    assert config.attention is None
    mag = ModelConfig.from_dict(
        json.loads((FIXTURES / "titans-mag" / "config.json").read_text())["config"])
    assert mag.attention.window == 4 and mag.memory.persistent_tokens == 2
    assert mag.memory.dgd and not mag.memory.momentum
    transformer = ModelConfig.from_dict(
        json.loads((FIXTURES / "transformer" / "config.json").read_text())["config"])
    assert transformer.memory is None and transformer.attention.window == 5


def test_a_0_1_run_config_loads_as_the_same_run():
    old = json.loads((FIXTURES / "run_config_tiny_hope.json").read_text())
    migrated = RunConfig.from_dict(old)
    recipe = get_recipe("tiny-hope")
    # What 0.1 computed where today's defaults differ (nestlearn.models.migrate).
    pinned = {"memory_target": "v", "eta_max": 1.0 * (1 - 0.9) / (64 * 4), "chunk_size": 64,
              "eta_init": 0.5, "theta_init": 0.5, "forget_init": 1e-4}
    expected = recipe.model.to_dict()
    expected["memory"] |= pinned
    assert migrated.model.to_dict() | {"mlp_hidden": None} == expected | {
        "mlp_hidden": None, "cms": migrated.model.to_dict()["cms"]}
    assert migrated.model.mlp_width == recipe.model.mlp_width
    assert migrated.model.cms_layer_config() == dataclasses.replace(
        recipe.model.cms_layer_config(), chunk_step=None)  # 0.1 CMS steps had no ceiling
    assert RunConfig.from_dict(json.loads(migrated.to_json())) == migrated


def test_every_flat_field_has_a_home():
    # Each 0.1 field maps to a field of the section's layer config.
    config = ModelConfig(arch="hope")
    mag = ModelConfig(arch="titans-mag", attention={"window": 2})
    for flat, (section, name) in FLAT_FIELDS.items():
        holders = [getattr(c, section) for c in (config, mag)]
        assert any(h is not None and hasattr(h, name) for h in holders), flat


def test_a_flat_key_of_an_unknown_kind_is_still_refused():
    with pytest.raises(ValueError, match="dimension"):
        ModelConfig.from_dict({"arch": "titans", "memory_depth": 2, "dimension": 3})
