import dataclasses
import itertools
import json
import math

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.training import NonFiniteError, Trainer, train
from nestlearn.training.metrics_log import read_records
from nestlearn.training.schedule import lr_factor
from trainkit import tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


def test_a_few_steps_lower_the_loss(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=40", "train.eval_every=20")
    result = train(config, progress=False)
    losses = list(result.losses.values())
    assert result.status == "completed" and result.step == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert result.evals[40]["loss"] < result.evals[20]["loss"] + 0.05
    evaluation = result.evals[40]
    assert math.isclose(evaluation["ppl"], math.exp(evaluation["loss"]), rel_tol=1e-9)
    # byte tokens: bits per byte is the loss in bits times targets per byte (close to 1)
    assert 0.9 * evaluation["loss"] / math.log(2) < evaluation["bpb"]
    run = tmp_path / "run"
    records = read_records(run)
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 41))
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("step,split,loss")
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert not (run / "model").exists()  # the final model is the latest checkpoint
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 258  # taken from the byte tokenizer


def test_bpe_run_takes_its_vocabulary_from_the_tokenizer(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "data.tokenizer=bpe", "data.vocab_size=300",
                         "train.steps=3")
    result = train(config, progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    tokenizer = json.loads((tmp_path / "run" / "data" / "tokenizer.json").read_text())
    assert tokenizer["type"] == "bpe"
    assert saved["model"]["vocab_size"] == saved["data"]["vocab_size"] == 300
    # BPE tokens span several bytes: fewer bits per byte than bits per token
    assert result.evals[3]["bpb"] < result.evals[3]["loss"] / math.log(2)


@pytest.mark.parametrize("arch", ["transformer", "hope", "titans"])
def test_bf16_autocast_path_trains(corpus, tmp_path, arch):
    # the CUDA default (autocast "auto" on a GPU); forced here on the CPU. The memory ops run
    # in float32 inside it (nestlearn.ops._precision).
    config = tiny_config(corpus, tmp_path / "run", "train.autocast=bf16", "train.steps=10",
                         f"model.arch={arch}")
    losses = list(train(config, progress=False).losses.values())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["titans", "titans-mag", "hope", "hope-attention"])
def test_memory_architectures_train(corpus, tmp_path, arch):
    window = ["model.attention.window=16"] if arch == "titans-mag" else []
    config = tiny_config(corpus, tmp_path / "run", *window, f"model.arch={arch}",
                         "train.steps=20")
    losses = list(train(config, progress=False).losses.values())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3


def test_schedule_warmup_then_cosine_to_min():
    factors = [lr_factor(s, 10, 110, "cosine", 0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] == pytest.approx(0.1)
    assert lr_factor(50, 10, 110, "constant") == 1.0


def test_learning_rate_follows_the_schedule(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=8", "schedule.warmup_steps=4",
                         "optim.lr=0.01")
    train(config, progress=False)
    lrs = [r["lr"] for r in read_records(tmp_path / "run") if r["split"] == "train"]
    expected = [0.01 * lr_factor(s, 4, 8, "cosine", 0.1) for s in range(8)]
    assert lrs == pytest.approx(expected)


@pytest.mark.parametrize("name", ["sgd", "muon", "m3", "delta-momentum",
                                  "preconditioned-momentum", "deep-momentum"])
def test_nestlearn_optimizers_train(corpus, tmp_path, name):
    lr = {"sgd": "0.3", "muon": "0.02", "m3": "0.02"}.get(name, "0.01")
    config = tiny_config(corpus, tmp_path / "run", f"optim.name={name}", f"optim.lr={lr}",
                         "train.steps=25")
    losses = list(train(config, progress=False).losses.values())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def _poison_state_at(trainer, bad_step):
    """Make block 1's memory state NaN on the forward of step ``bad_step``."""
    forward = trainer.model.forward

    def poisoned(ids, state=None):
        logits, new_state = forward(ids, state)
        if trainer.step + 1 == bad_step:
            blocks = list(new_state.blocks)
            blocks[1] = torch.full((2, 2), float("nan"))
            new_state = dataclasses.replace(new_state, blocks=tuple(blocks))
        return logits, new_state

    trainer.model.forward = poisoned


def test_nan_in_memory_state_stops_and_names_it(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=10")
    trainer = Trainer(config, progress=False)
    _poison_state_at(trainer, 4)
    with pytest.raises(NonFiniteError) as err:
        trainer.run()
    message = str(err.value)
    assert "step 4" in message and "memory state.blocks[1]" in message
    assert "step_00000003" in message
    # the last good state is on disk and resumes (to the same losses as before the stop)
    before = [r["loss"] for r in read_records(tmp_path / "run") if r["split"] == "train"]
    resumed = Trainer(config, resume=True, progress=False)
    assert resumed.step == 3
    result = resumed.run()
    assert result.step == 10
    after = [r["loss"] for r in read_records(tmp_path / "run") if r["split"] == "train"]
    assert after[:3] == before[:3]


def test_nan_loss_stops_and_names_the_loss(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=10")
    trainer = Trainer(config, progress=False)
    forward = trainer.model.forward

    def nan_logits(ids, state=None):
        logits, new_state = forward(ids, state)
        if trainer.step + 1 == 2:
            logits = logits * float("nan")
        return logits, new_state

    trainer.model.forward = nan_logits
    with pytest.raises(NonFiniteError, match="step 2: NaN/Inf in the loss"):
        trainer.run()


def test_model_error_during_training_stops_with_the_step(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=10")
    trainer = Trainer(config, progress=False)
    forward = trainer.model.forward

    def failing(ids, state=None):
        if trainer.step + 1 == 3:
            raise NonFiniteError("alpha: got non-finite values; allowed: finite values")
        return forward(ids, state)

    trainer.model.forward = failing
    with pytest.raises(NonFiniteError, match=r"step 3: NaN/Inf in the forward pass \(alpha: got"):
        trainer.run()
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").exists()


def test_bad_input_error_during_training_is_not_taken_for_a_nan(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=10")
    trainer = Trainer(config, progress=False)

    def failing(ids, state=None):
        raise NestlearnError("ids: got a bad batch; allowed: a good one")

    trainer.model.forward = failing
    with pytest.raises(NestlearnError, match=r"^ids: got a bad batch") as err:
        trainer.run()
    assert not isinstance(err.value, NonFiniteError)


def test_nan_gradient_names_the_parameter(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=10")
    trainer = Trainer(config, progress=False)
    weight = trainer.model.backbone.embed.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.step + 1 == 3 else g)
    with pytest.raises(NonFiniteError, match=r"step 3: NaN/Inf in gradient of backbone\.embed"):
        trainer.run()


def test_an_overflowing_gradient_norm_stops_the_run_before_the_update(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=10")
    trainer = Trainer(config, progress=False)
    weight = trainer.model.backbone.embed.weight
    before: list[torch.Tensor] = []

    def overflow(grad):
        if trainer.step + 1 != 3:
            return grad
        before.extend(p.detach().clone() for p in trainer.model.parameters())
        # finite float32 gradients whose squares are not: clipping would zero the update
        return grad.sign() * 1e30

    weight.register_hook(overflow)
    with pytest.raises(NonFiniteError, match=r"step 3: NaN/Inf in the gradient norm"):
        trainer.run()
    assert trainer.step == 2
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before, strict=True))


def test_fresh_run_refuses_a_folder_with_checkpoints(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=2")
    train(config, progress=False)
    with pytest.raises(NestlearnError, match="already holds checkpoints"):
        train(config, progress=False)


def test_missing_corpus_is_one_clear_error(tmp_path):
    config = tiny_config(tmp_path / "nope.txt", tmp_path / "run")
    with pytest.raises(NestlearnError, match=r"nope\.txt") as err:
        train(config, progress=False)
    assert "\n" not in str(err.value)
