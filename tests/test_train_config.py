import json

import pytest

from nestlearn.errors import NestlearnError
from nestlearn.training.recipes import RECIPES, get_recipe, list_recipes
from nestlearn.training.runconfig import (
    DataConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    field_names,
)


def test_every_recipe_is_a_valid_config_that_round_trips_through_json():
    assert len(list_recipes()) == len(RECIPES) >= 12
    for recipe in list_recipes():
        config = recipe.build()
        assert config.name == recipe.name
        again = RunConfig.from_dict(json.loads(config.to_json()))
        assert again == config


def test_overrides_are_parsed_to_the_field_type():
    config = apply_overrides(get_recipe("tiny-transformer"), [
        "model.dim=64", "model.attention.window=16", "optim.lr=1e-2", "optim.betas=(0.8, 0.99)",
        "model.tie_embeddings=false", "train.device=cpu", "data.corpus=wiki",
        "model.attention.window=none",
    ])
    assert config.model.dim == 64 and config.model.attention.window is None
    assert config.optim.lr == 0.01 and config.optim.betas == (0.8, 0.99)
    assert config.model.tie_embeddings is False
    assert config.train.device == "cpu" and config.data.corpus == "wiki"


@pytest.mark.parametrize(("assignment", "message"), [
    ("train.stepz=3", "unknown field 'train.stepz'; allowed fields of train: steps,"),
    ("trian.steps=3", "unknown field 'trian'; allowed sections: name, model, data"),
    ("train.steps=3.5", "train.steps: got '3.5'; allowed: an integer"),
    ("train.steps=0", "train.steps: got 0; allowed: an int >= 1"),
    ("optim.name=adam", "optim.name: got 'adam'; allowed: one of 'adamw', 'sgd', 'muon'"),
    ("optim.betas=0.9", "optim.betas: got '0.9'; allowed: 2 comma-separated values"),
    ("optim.betas=0.9,1.5", "optim.betas[1]: got 1.5; allowed: a number in [0, 1)"),
    ("model.tie_embeddings=maybe", "model.tie_embeddings: got 'maybe'; allowed: true or false"),
    ("model.attention.window=wide", "model.attention.window: got 'wide'; allowed: int | None"),
    ("train=3", "'train' is a section; allowed: train.steps"),
    ("train.steps.x=3", "'train.steps' is a value, not a section"),
    ("steps", "--set: got 'steps'; allowed: FIELD=VALUE"),
    ("data.tokenizer=chars", "data.tokenizer: got 'chars'; allowed: one of 'byte', 'bpe'"),
    ("train.device=tpu", "train.device: got 'tpu'; allowed: auto, cpu, cuda, cuda:N"),
])
def test_bad_overrides_give_one_clear_error(assignment, message):
    with pytest.raises(NestlearnError) as err:
        apply_overrides(get_recipe("tiny-transformer"), [assignment])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sections_validate_on_construction():
    with pytest.raises(NestlearnError, match=r"data\.seq_len: got 0"):
        DataConfig(seq_len=0)
    with pytest.raises(NestlearnError, match=r"optim\.lr: got nan"):
        OptimConfig(lr=float("nan"))
    with pytest.raises(NestlearnError, match=r"schedule\.min_lr_ratio: got 2"):
        ScheduleConfig(min_lr_ratio=2)
    with pytest.raises(NestlearnError, match=r"train\.autocast: got 'fp8'"):
        TrainConfig(autocast="fp8")
    with pytest.raises(NestlearnError, match="data: got dict; allowed: DataConfig"):
        RunConfig(data={})


def test_from_dict_refuses_unknown_keys_and_wrong_types():
    data = get_recipe("tiny-hope").to_dict()
    data["train"]["stepz"] = 3
    with pytest.raises(NestlearnError, match=r"train\.stepz: unknown field"):
        RunConfig.from_dict(data)
    data = get_recipe("tiny-hope").to_dict()
    data["optim"]["lr"] = "fast"
    with pytest.raises(NestlearnError, match=r"optim\.lr: got 'fast'; allowed: a number"):
        RunConfig.from_dict(data)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(NestlearnError, match="--recipe: got 'tiny'; allowed: tiny-transformer"):
        get_recipe("tiny")


def test_field_names_cover_every_section():
    names = field_names(get_recipe("tiny-transformer"))
    for name in ("model.dim", "data.seq_len", "optim.betas", "schedule.warmup_steps",
                 "train.checkpoint_every"):
        assert name in names
