"""The continual runner, learners and lr tuning on tiny hand-built streams."""

from __future__ import annotations

import math

import pytest
import torch

from continual_toys import class_stream, forecast_stream, install_fakes, lm_stream
from nestlearn.continual import runner
from nestlearn.continual.learners import LMLearner, bin_centers, make_learner
from nestlearn.continual.runner import (
    RowSpec,
    build_row_model,
    model_config,
    run_row,
    run_suite,
    stack_model,
    train_stream,
)
from nestlearn.continual.tuning import tune_lr
from nestlearn.errors import NestlearnError, NonFiniteError

ROW_KEYS = {"method", "arch", "seed", "R", "R_loss", "baseline", "baseline_loss", "curve",
            "metrics", "resources", "extras"}


def _check_row(row: dict, tasks: int) -> None:
    assert set(row) == ROW_KEYS
    for key in ("R", "R_loss"):
        assert len(row[key]) == tasks and all(len(r) == tasks for r in row[key])
        assert all(math.isfinite(v) for r in row[key] for v in r)
    assert all(0.0 <= v <= 1.0 for r in row["R"] for v in r)
    assert len(row["baseline"]) == len(row["baseline_loss"]) == tasks
    assert row["curve"] and all(math.isfinite(c["loss"]) for c in row["curve"])
    assert [c["task"] for c in row["curve"]] == sorted(c["task"] for c in row["curve"])
    assert row["resources"]["tokens"] > 0


@pytest.mark.parametrize(("method", "arch"), [("finetune", "transformer"),
                                              ("nested", "titans")])
def test_run_row_on_a_tiny_lm_stream_is_well_formed(monkeypatch, method, arch) -> None:
    install_fakes(monkeypatch)
    row = run_row(lm_stream(), RowSpec(method, arch, steps_per_task=8, batch_size=4,
                                       eval_budget=64))
    _check_row(row, 2)
    assert len(row["extras"]["R_bits_per_byte"]) == 2
    assert row["extras"]["state_policy"] == ("carry" if method == "nested" else "reset")


@pytest.mark.parametrize(("method", "arch"), [("finetune", "transformer"),
                                              ("replay", "hope")])
def test_run_row_on_a_tiny_classification_stream_is_well_formed(monkeypatch, method,
                                                                arch) -> None:
    install_fakes(monkeypatch)
    row = run_row(class_stream(), RowSpec(method, arch, steps_per_task=6, batch_size=4))
    _check_row(row, 2)
    assert row["metrics"]["average_accuracy"] == sum(row["R"][-1]) / 2


def test_forecast_rows_give_bin_accuracy_mae_and_online_metrics() -> None:
    stream = forecast_stream()
    row = train_stream(stream, RowSpec("finetune", "transformer", steps_per_task=6,
                                       batch_size=4, eval_budget=64))
    assert len(row["R"]) == 2 and all(v >= 0 for r in row["R_loss"] for v in r)
    assert [o["task"] for o in row["extras"]["online"]] == [0, 1]
    centers = bin_centers(stream.bins)
    torch.testing.assert_close(centers, torch.tensor([-1.5, -0.5, 0.5, 1.5]))


def test_carry_differs_from_reset_and_is_deterministic() -> None:
    stream = lm_stream()

    def run(policy: str) -> dict:
        return train_stream(stream, RowSpec("finetune", "titans", steps_per_task=6,
                                            batch_size=4, eval_budget=64,
                                            state_policy=policy))

    carry, again, reset = run("carry"), run("carry"), run("reset")
    assert carry["R_loss"] == again["R_loss"] and carry["curve"] == again["curve"]
    assert carry["R_loss"] != reset["R_loss"]


def test_carry_walks_each_row_through_the_split_in_order() -> None:
    stream = lm_stream(length=100, seq_len=8)
    learner = make_learner(stream, torch.nn.Linear(1, 1), state_policy="carry", batch_size=4)
    split = stream.tasks[0].train
    generator = torch.Generator().manual_seed(0)
    first = learner.draw(split, 4, generator)
    second = learner.draw(split, 4, generator)
    starts = torch.arange(4) * 25
    torch.testing.assert_close(first.inputs, split.tokens[starts[:, None] + torch.arange(8)])
    torch.testing.assert_close(second.inputs,
                               split.tokens[starts[:, None] + 8 + torch.arange(8)])


def test_evaluation_from_a_carried_state_leaves_it_unchanged() -> None:
    stream = lm_stream()
    torch.manual_seed(0)
    model = build_row_model(stream, model_config("titans", stream.vocab_size))
    learner = make_learner(stream, model, state_policy="carry", batch_size=4, eval_budget=64)
    assert isinstance(learner, LMLearner)
    batch = learner.draw(stream.tasks[0].train, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, state = learner.forward(batch, learner.train_state())
    learner.keep_state(state)
    kept = learner.carried
    first = learner.evaluate(stream.tasks[1].test)
    assert learner.carried is kept
    assert learner.evaluate(stream.tasks[1].test) == first


def test_finetune_forgets_a_class_incremental_task_and_replay_forgets_less() -> None:
    stream = class_stream(rows=128)
    for seed in (0, 1):
        common = {"arch": "transformer", "seed": seed, "steps_per_task": 60,
                  "batch_size": 16, "lr": 3e-3}
        plain = train_stream(stream, RowSpec("finetune", **common))["R"]
        replay = train_stream(stream, RowSpec("replay", **common))["R"]
        assert plain[0][0] > 0.9 and replay[0][0] > 0.9  # task 0 learned
        assert plain[1][0] < 0.2  # overwritten by task 1
        assert replay[1][0] > 0.8 and replay[1][1] > 0.8


def test_a_nonfinite_loss_names_the_row_and_the_step(monkeypatch) -> None:
    def bad_loss(self, logits, batch):
        return logits.sum() * float("nan")

    monkeypatch.setattr(LMLearner, "loss", bad_loss)
    with pytest.raises(NonFiniteError, match=r"row finetune/transformer/seed 3: .* at step 1 "):
        train_stream(lm_stream(), RowSpec("finetune", "transformer", seed=3, steps_per_task=2,
                                          batch_size=2, eval_budget=32))


def test_model_sets_apply_where_the_arch_has_the_field() -> None:
    assert model_config("titans", 10, ("memory.chunk_size=8", "dim=64")).memory.chunk_size == 8
    assert model_config("transformer", 10, ("memory.chunk_size=8",)).memory is None
    assert model_config("hope-stacked", 10).arch == "transformer"
    with pytest.raises(NestlearnError, match="model_sets dimm=64"):
        model_config("transformer", 10, ("dimm=64",))


def test_stacking_a_classifier_keeps_its_function_at_zero_inner_lr(monkeypatch) -> None:
    stream = class_stream()
    torch.manual_seed(0)
    model = build_row_model(stream, model_config("transformer", stream.vocab_size))
    monkeypatch.setattr(runner, "STACK_INNER_LR", 0.0)
    stacked = stack_model(model, teach_lm=False)
    assert stacked.config.backbone.arch == "hope-attention"
    ids = stream.tasks[0].test.inputs[:5]
    with torch.no_grad():
        torch.testing.assert_close(stacked(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)


def test_hope_stacked_rows_continue_as_hope_attention() -> None:
    row = train_stream(lm_stream(), RowSpec("finetune", "hope-stacked", steps_per_task=4,
                                            batch_size=2, eval_budget=32))
    assert row["extras"]["model"]["arch"] == "hope-attention"
    assert row["extras"]["stacked_after_task"] == 0


def test_run_suite_writes_results_through_the_report(monkeypatch, tmp_path) -> None:
    install_fakes(monkeypatch)
    import nestlearn.continual.report as report

    specs = [RowSpec("finetune", "transformer", seed=s, steps_per_task=3, batch_size=2,
                     eval_budget=32) for s in (0, 1)]
    results = run_suite(lm_stream(), specs, tmp_path / "out")
    assert results["seeds"] == [0, 1] and len(results["rows"]) == 2
    assert results["stream"]["tasks"] == ["cycle0", "cycle1"]
    assert results["stream"]["loss_name"] == "loss"
    assert {"nestlearn", "torch", "python", "numpy"} <= set(results["versions"])
    assert [kind for kind, _ in report.saved] == ["results", "report"]


def test_tuning_reads_only_the_first_tasks_train_and_validation(monkeypatch) -> None:
    stream = lm_stream(tasks=3)
    touched = []
    original_draw, original_eval = LMLearner.draw, LMLearner.evaluate
    monkeypatch.setattr(LMLearner, "draw", lambda self, split, *a, **k: (
        touched.append(id(split)), original_draw(self, split, *a, **k))[1])
    monkeypatch.setattr(LMLearner, "evaluate", lambda self, split: (
        touched.append(id(split)), original_eval(self, split))[1])
    best, table = tune_lr(stream, RowSpec("ewc", "transformer", steps_per_task=3,
                                          batch_size=2, eval_budget=32), grid=(1e-3, 1e-2))
    first = stream.tasks[0]
    assert set(touched) == {id(first.train), id(first.validation)}
    assert [r["lr"] for r in table] == [1e-3, 1e-2]
    assert best == max(table, key=lambda r: (r["score"], -r["loss"]))["lr"]
