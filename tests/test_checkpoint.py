import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nestlearn.errors import NestlearnError
from nestlearn.training import Trainer, train
from nestlearn.training import checkpoint as ckpt
from nestlearn.training.metrics_log import read_records
from nestlearn.treeio import flatten, unflatten
from trainkit import tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


def _train_losses(run_dir):
    return [r["loss"] for r in read_records(run_dir) if r["split"] == "train"]


def _final_weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE))


@pytest.mark.parametrize(("optimizer", "arch"), [("adamw", "transformer"), ("m3", "transformer"),
                                                ("deep-momentum", "hope")])
def test_resume_equals_an_uninterrupted_run_bitwise(corpus, tmp_path, optimizer, arch):
    extra = ("train.steps=14", "train.eval_every=5", f"optim.name={optimizer}",
             "optim.lr=0.01", f"model.arch={arch}")
    straight = tmp_path / "straight"
    train(tiny_config(corpus, straight, *extra), progress=False)

    resumed = tmp_path / "resumed"
    config = tiny_config(corpus, resumed, *extra)
    first = train(config, progress=False, stop_at=6)
    assert first.status == "interrupted" and first.step == 6
    second = train(config, resume=True, progress=False)
    assert second.status == "completed" and min(second.losses) == 7

    assert _train_losses(resumed) == _train_losses(straight)  # exact float equality
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [r for r in read_records(resumed) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10, 14]


def test_resume_may_turn_on_activation_checkpointing(corpus, tmp_path):
    # checkpoint_segment changes what is kept for the backward, not what is computed
    extra = ("train.steps=8", "model.arch=hope", "optim.lr=0.01")
    straight = tmp_path / "straight"
    train(tiny_config(corpus, straight, *extra), progress=False)
    resumed = tmp_path / "resumed"
    first = train(tiny_config(corpus, resumed, *extra), progress=False, stop_at=4)
    assert first.step == 4
    trainer = Trainer(tiny_config(corpus, resumed, *extra, "model.checkpoint_segment=8"),
                      resume=True, progress=False)
    assert trainer.model.config.checkpoint_segment == 8  # the resumed model does checkpoint
    second = trainer.run()
    assert second.status == "completed"
    assert json.loads((resumed / "config.json").read_text())["model"]["checkpoint_segment"] == 8
    assert _train_losses(resumed) == pytest.approx(_train_losses(straight), rel=1e-5)


def _one_checkpoint(corpus, run_dir):
    train(tiny_config(corpus, run_dir, "train.steps=3"), progress=False)
    return ckpt.latest_checkpoint(run_dir)


def test_truncated_tensor_file_is_refused(corpus, tmp_path):
    path = _one_checkpoint(corpus, tmp_path / "run")
    data = (path / ckpt.STATE_FILE).read_bytes()
    (path / ckpt.STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(NestlearnError, match=r"refused, checksum mismatch in state.safetensors"):
        ckpt.load_checkpoint(path)
    config = tiny_config(corpus, tmp_path / "run", "train.steps=6")
    with pytest.raises(NestlearnError, match="refused"):
        Trainer(config, resume=True, progress=False)


def test_edited_manifest_and_wrong_checksum_are_refused(corpus, tmp_path):
    path = _one_checkpoint(corpus, tmp_path / "run")
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"][ckpt.MODEL_FILE] = "0" * 64
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NestlearnError, match=r"checksum mismatch in model\.safetensors"):
        ckpt.load_checkpoint(path)
    manifest["payload"]["step"] = 99  # payload edited: its own checksum no longer matches
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NestlearnError, match=r"checksum mismatch in checkpoint\.json"):
        ckpt.load_checkpoint(path)
    (path / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(NestlearnError, match="not valid JSON"):
        ckpt.load_checkpoint(path)


def test_config_mismatch_is_refused_before_loading(corpus, tmp_path):
    run = tmp_path / "run"
    _one_checkpoint(corpus, run)
    mismatch = r"config mismatch \(model\.dim: checkpoint 32, now 64"
    with pytest.raises(NestlearnError, match=mismatch):
        Trainer(tiny_config(corpus, run, "model.dim=64"), resume=True, progress=False)
    with pytest.raises(NestlearnError, match=r"optim\.lr"):
        Trainer(tiny_config(corpus, run, "optim.lr=0.5"), resume=True, progress=False)
    # more steps is allowed
    Trainer(tiny_config(corpus, run, "train.steps=5"), resume=True, progress=False)


def test_mismatched_tensors_are_refused_and_nothing_is_loaded(corpus, tmp_path):
    path = _one_checkpoint(corpus, tmp_path / "run")
    checkpoint = ckpt.load_checkpoint(path)
    other = Trainer(tiny_config(corpus, tmp_path / "other", "model.dim=64"), progress=False)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(NestlearnError, match=r"model tensor .*: got \(258, 32\)"):
        other._restore(checkpoint)
    after = other.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_without_checkpoint_is_one_clear_error(corpus, tmp_path):
    with pytest.raises(NestlearnError, match="has no checkpoint"):
        Trainer(tiny_config(corpus, tmp_path / "empty"), resume=True, progress=False)


def test_write_is_atomic_and_old_checkpoints_are_pruned(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus, run, "train.steps=8", "train.checkpoint_every=2",
                      "train.keep_checkpoints=2"), progress=False)
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_00000006", "step_00000008"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    # a half-written temporary folder is never taken for a checkpoint
    (run / "checkpoints" / ".tmp-step_00000010-1").mkdir()
    assert ckpt.latest_checkpoint(run).name == "step_00000008"
    # and is cleared by the next save
    train(tiny_config(corpus, run, "train.steps=9"), resume=True, progress=False)
    assert not (run / "checkpoints" / ".tmp-step_00000010-1").exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000008", "step_00000009"]


def test_tree_round_trip_keeps_types_and_bits():
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 2)},
                  7: {"buf": [torch.ones(2, dtype=torch.float64), None]}},
        "param_groups": [{"lr": 0.1 + 0.2, "betas": (0.9, 0.95), "params": [0, 7],
                          "flag": True, "name": "x"}],
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 3, 0, 0.0),
    }
    skeleton, tensors = flatten(tree, "t/")
    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert set(back["state"]) == {0, 7}
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert back["state"][7]["buf"][0].dtype == torch.float64
    assert back["param_groups"][0]["lr"] == 0.1 + 0.2
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert np.array_equal(back["numpy"][1], tree["numpy"][1])


def test_rng_capture_restores_all_generators():
    import random

    state = ckpt.capture_rng()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng(json_round_trip(state))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def json_round_trip(state):
    skeleton, tensors = flatten(state, "rng/")
    return unflatten(json.loads(json.dumps(skeleton)), tensors)
