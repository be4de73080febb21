"""``optim.levels``: multi-frequency parameter levels set from the run config, trained, and
resumed bit for bit."""

import pytest
import torch
from safetensors.torch import load_file

from nestlearn.errors import NestlearnError
from nestlearn.models import ModelConfig, build_model
from nestlearn.optim import MultiFrequency
from nestlearn.training import checkpoint as ckpt
from nestlearn.training import train
from nestlearn.training.builders import build_optimizer
from nestlearn.training.metrics_log import read_records
from nestlearn.training.runconfig import OptimConfig, RunConfig, apply_overrides
from trainkit import tiny_config, write_corpus

SLOW_MLP = "backbone.blocks.*.mlp.*"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt", paragraphs=80)


def small_transformer():
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="transformer", vocab_size=32, dim=16, layers=2, heads=2))


def test_levels_are_set_from_text_and_round_trip():
    config = apply_overrides(RunConfig(), [f"optim.levels={SLOW_MLP}=4, *.attn.out.*=2"])
    assert config.optim.levels == (f"{SLOW_MLP}=4", "*.attn.out.*=2")
    assert config.optim.level_periods() == [(SLOW_MLP, 4), ("*.attn.out.*", 2)]
    assert RunConfig.from_dict(config.to_dict()).optim == config.optim


@pytest.mark.parametrize("levels", [("mlp",), ("mlp=0",), ("=4",), ("mlp=x",),
                                    ("mlp=2", "mlp=3")])
def test_bad_levels_are_refused(levels):
    with pytest.raises(NestlearnError, match=r"optim\.levels\[\d\]"):
        OptimConfig(levels=levels)


def test_build_optimizer_groups_parameters_by_period():
    model = small_transformer()
    optimizer = build_optimizer(OptimConfig(levels=(f"{SLOW_MLP}=4", "*.attn.out.*=2")), model)
    assert isinstance(optimizer, MultiFrequency)
    names = {id(p): n for n, p in model.named_parameters()}
    by_period = {}
    for group in optimizer.param_groups:
        by_period.setdefault(group["period"], set()).update(names[id(p)] for p in group["params"])
    assert by_period[4] == {f"backbone.blocks.{i}.mlp.{w}.weight" for i in range(2)
                            for w in ("gate", "up", "down")}
    assert by_period[2] == {f"backbone.blocks.{i}.attn.out.weight" for i in range(2)}
    assert len(by_period[1]) == 16 - 8
    # weight decay still follows the parameter kind inside each level
    assert all(group["weight_decay"] == 0.0 for group in optimizer.param_groups
               if any(p.ndim < 2 for p in group["params"]))
    assert not isinstance(build_optimizer(OptimConfig(), model), MultiFrequency)


def test_a_pattern_matching_nothing_or_overlapping_is_refused():
    model = small_transformer()
    with pytest.raises(NestlearnError, match=r"pattern '\*\.cms\.\*' matches no parameter"):
        build_optimizer(OptimConfig(levels=("*.cms.*=4",)), model)
    overlap = r"'backbone.blocks.0.mlp.gate.weight' matches '\*\.mlp\.\*' and"
    with pytest.raises(NestlearnError, match=overlap):
        build_optimizer(OptimConfig(levels=("*.mlp.*=4", "*.blocks.0.*=2")), model)


def _losses(run_dir):
    return [r["loss"] for r in read_records(run_dir) if r["split"] == "train"]


def test_slow_level_steps_every_period_and_resumes_bitwise(corpus, tmp_path):
    extra = ("train.steps=7", f"optim.levels={SLOW_MLP}=3", "optim.lr=0.01",
             "schedule.warmup_steps=0", "train.checkpoint_every=1", "train.keep_checkpoints=8")
    straight = tmp_path / "straight"
    train(tiny_config(corpus, straight, *extra), progress=False)

    def weights(step):
        return load_file(str(ckpt.checkpoint_dir(straight, step) / ckpt.MODEL_FILE))

    slow = "backbone.blocks.0.mlp.up.weight"
    fast = "backbone.blocks.0.attn.qkv.weight"
    # the slow level moves only at steps 3 and 6; the others every step
    changed = [not torch.equal(weights(s)[slow], weights(s + 1)[slow]) for s in range(1, 7)]
    assert changed == [False, True, False, False, True, False]
    assert all(not torch.equal(weights(s)[fast], weights(s + 1)[fast]) for s in range(1, 7))

    # stopped at step 4: one gradient of the next period is in the checkpoint's buffers
    resumed = tmp_path / "resumed"
    config = tiny_config(corpus, resumed, *extra)
    assert train(config, progress=False, stop_at=4).step == 4
    assert train(config, resume=True, progress=False).status == "completed"
    assert _losses(resumed) == _losses(straight)
    a, b = weights(7), load_file(str(ckpt.checkpoint_dir(resumed, 7) / ckpt.MODEL_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_other_levels_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, "train.steps=2", f"optim.levels={SLOW_MLP}=3"),
          progress=False)
    checkpoint = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    model = small_transformer()
    other = build_optimizer(OptimConfig(levels=(f"{SLOW_MLP}=2",)), model)
    with pytest.raises(NestlearnError, match=r"level periods \[.*\]; allowed"):
        ckpt.check_optimizer_state(checkpoint, other)
    with pytest.raises(NestlearnError, match="optimizer state is malformed"):
        ckpt.check_optimizer_state(checkpoint, build_optimizer(OptimConfig(), model))
