"""Continual-learning methods: each one's defining computation, checked against a hand
computation or a statistical property."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from continual_toys import class_stream, lm_stream
from nestlearn.continual.learners import Batch, make_learner
from nestlearn.continual.methods import (
    EWC,
    METHOD_DEFAULTS,
    Joint,
    LwF,
    OnlineEWC,
    ReservoirBuffer,
    distill_loss,
    ewc_penalty,
    level_periods,
    make_method,
)
from nestlearn.continual.runner import RowSpec, build_row_model, model_config, train_stream
from nestlearn.errors import NestlearnError


class TwoParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.5))
        self.b = nn.Parameter(torch.tensor(-2.0))


def test_ewc_penalty_is_the_hand_computation_with_one_anchor_per_task() -> None:
    model = TwoParams()
    anchors = [({"a": torch.tensor(2.0), "b": torch.tensor(0.5)},
                {"a": torch.tensor(1.0), "b": torch.tensor(-1.0)}),
               ({"a": torch.tensor(0.25), "b": torch.tensor(4.0)},
                {"a": torch.tensor(0.5), "b": torch.tensor(-3.0)})]
    # lambda / 2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2
    hand = 10.0 / 2 * (2.0 * 0.5 ** 2 + 0.5 * 1.0 ** 2 + 0.25 * 1.0 ** 2 + 4.0 * 1.0 ** 2)
    penalty = ewc_penalty(model, anchors, 10.0)
    assert penalty.item() == pytest.approx(hand)
    penalty.backward()
    # d/da = lambda * sum_k F_k,a (a - a*_k)
    assert model.a.grad.item() == pytest.approx(10.0 * (2.0 * 0.5 + 0.25 * 1.0))


def _fixed_fisher(method: EWC, values: list[dict[str, torch.Tensor]]) -> None:
    it = iter(values)
    method._fisher = lambda learner, task_index: next(it)


class _Holder:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


def test_ewc_keeps_one_anchor_per_task_and_online_ewc_one_decayed_fisher() -> None:
    fishers = [{"a": torch.tensor(1.0), "b": torch.tensor(2.0)},
               {"a": torch.tensor(3.0), "b": torch.tensor(0.0)}]
    model = TwoParams()
    holder = _Holder(model)
    ewc = EWC({"lambda": 1.0})
    online = OnlineEWC({"lambda": 1.0, "gamma": 0.5})
    _fixed_fisher(ewc, list(fishers))
    _fixed_fisher(online, list(fishers))
    for method in (ewc, online):
        method.end_task(holder, 0)
    with torch.no_grad():
        model.a.add_(1.0)  # the weights move between the tasks
    for method in (ewc, online):
        method.end_task(holder, 1)
    assert len(ewc.anchors) == 2
    assert ewc.anchors[0][1]["a"].item() == 1.5 and ewc.anchors[1][1]["a"].item() == 2.5
    assert len(online.anchors) == 1
    fisher, anchor = online.anchors[0]
    # F = gamma * F_0 + F_1; anchor = the latest weights
    assert fisher["a"].item() == pytest.approx(0.5 * 1.0 + 3.0)
    assert fisher["b"].item() == pytest.approx(0.5 * 2.0 + 0.0)
    assert anchor["a"].item() == 2.5


def test_empirical_fisher_is_the_mean_squared_example_gradient() -> None:
    stream = class_stream()
    torch.manual_seed(0)
    model = build_row_model(stream, model_config("transformer", stream.vocab_size))
    learner = make_learner(stream, model, batch_size=4)
    method = EWC({"fisher_samples": 3})
    method.setup(seed=5, steps_per_task=1)
    fisher = method._fisher(learner, 0)
    generator = torch.Generator().manual_seed(5 * 1009 + 0)
    expected = torch.zeros_like(model.head.weight)
    for _ in range(3):
        batch = learner.draw(stream.tasks[0].train, 1, generator)
        model.zero_grad()
        learner.loss(learner.forward(batch)[0], batch).backward()
        expected += model.head.weight.grad ** 2
    torch.testing.assert_close(fisher["head.weight"], expected / 3)


def test_reservoir_keeps_every_item_with_the_same_probability() -> None:
    items, capacity, trials = 60, 12, 1500
    counts = torch.zeros(items)
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        buffer = ReservoirBuffer(capacity, generator)
        for start in range(0, items, 4):  # added in batches of 4 rows
            ids = torch.arange(start, start + 4)
            buffer.add(Batch(ids[:, None], ids))
        assert len(buffer) == capacity
        kept = torch.cat([row.targets for row in buffer.rows])
        assert kept.unique().numel() == capacity
        counts[kept] += 1
    frequency = counts / trials
    expected = capacity / items  # 0.2; one item's count: binomial, sd ~ 0.0103
    assert (frequency - expected).abs().max() < 0.045
    # early and late items alike (the classic mistake keeps the first ones)
    assert abs(frequency[:20].mean() - frequency[-20:].mean()) < 0.02


def test_joint_draws_rows_from_every_task_seen_so_far() -> None:
    stream = class_stream(tasks=3)
    learner = make_learner(stream, nn.Linear(1, 1), batch_size=300)
    generator = torch.Generator().manual_seed(0)
    joint = Joint()
    first = joint.batch(learner, 0, generator)
    assert set(first.targets.tolist()) <= {0, 1}
    batch = joint.batch(learner, 2, generator)
    tasks = batch.targets // 2
    share = torch.bincount(tasks, minlength=3).float() / batch.size
    assert (share - 1 / 3).abs().max() < 0.1, share
    assert batch.size == 300


def test_distillation_is_zero_when_the_student_is_the_teacher() -> None:
    logits = torch.randn(4, 7, 5)
    assert distill_loss(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(logits, torch.randn(4, 7, 5), 2.0).item() > 0.01


def test_lwf_term_is_zero_at_the_start_of_a_task_and_uses_old_classes_only() -> None:
    stream = class_stream(tasks=2)
    torch.manual_seed(0)
    model = build_row_model(stream, model_config("transformer", stream.vocab_size))
    learner = make_learner(stream, model, batch_size=8)
    lwf = LwF({"alpha": 1.0, "temperature": 2.0})
    lwf.begin_task(learner, 1)
    assert lwf.old_classes == [0, 1]
    batch = learner.draw(stream.tasks[1].train, 8, torch.Generator().manual_seed(0))
    logits, _ = learner.forward(batch)
    assert lwf.extra_loss(learner, batch, logits, 1).item() == pytest.approx(0.0, abs=1e-6)
    shifted = logits.clone()
    shifted[:, 2:] += 5.0  # new classes only: the old classes' distillation does not see it
    assert lwf.extra_loss(learner, batch, shifted, 1).item() == pytest.approx(0.0, abs=1e-6)
    shifted[:, 0] += 1.0
    assert lwf.extra_loss(learner, batch, shifted, 1).item() > 1e-3


def test_options_are_checked_against_the_stated_defaults() -> None:
    assert make_method("ewc").options == METHOD_DEFAULTS["ewc"]
    assert make_method("ewc", {"lambda": 5.0}).options["lambda"] == 5.0
    with pytest.raises(NestlearnError, match=r"options for replay: unknown \['lamda'\]"):
        make_method("replay", {"lamda": 1.0})
    with pytest.raises(NestlearnError, match="method"):
        make_method("sgd")
    with pytest.raises(NestlearnError, match="state_policy"):
        RowSpec("nested", "hope", state_policy="reset")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_inner_only_leaves_the_weights_bitwise_unchanged_after_task_zero() -> None:
    stream = lm_stream(tasks=3)
    spec = RowSpec("inner-only", "titans", steps_per_task=6, batch_size=4, eval_budget=64)
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def record(info) -> None:
        seen[info.step] = _snapshot(info.model)

    train_stream(stream, spec, callbacks=[record])
    after_task0 = seen[6]
    assert any(not torch.equal(seen[1][k], after_task0[k]) for k in after_task0)  # it trained
    for step in range(7, 19):
        for key, value in after_task0.items():
            assert torch.equal(seen[step][key], value), (step, key)


def test_nested_levels_step_only_at_their_period() -> None:
    stream = lm_stream(tasks=1)
    spec = RowSpec("nested", "hope", steps_per_task=8, batch_size=2, eval_budget=32,
                   model_sets=("cms.chunk_sizes=2,4",), options={"period_cap_div": 1})
    torch.manual_seed(spec.seed)  # the row's initial weights
    model = build_row_model(stream, model_config("hope", stream.vocab_size, spec.model_sets))
    periods = level_periods(model, 8, 1)
    assert periods["backbone.blocks.0.cms.initial.0.w_up"] == 2
    assert periods["backbone.blocks.1.cms.initial.1.w_down"] == 4
    assert periods["backbone.embed.weight"] == 1
    seen: dict[int, dict[str, torch.Tensor]] = {0: _snapshot(model)}
    train_stream(stream, spec,
                 callbacks=[lambda info: seen.update({info.step: _snapshot(info.model)})])
    for name, period in (("backbone.blocks.0.cms.initial.0.w_up", 2),
                         ("backbone.blocks.0.cms.initial.1.w_up", 4),
                         ("backbone.embed.weight", 1)):
        moved = [step for step in range(1, 9) if not torch.equal(seen[step][name],
                                                                  seen[step - 1][name])]
        assert moved == list(range(period, 9, period)), (name, moved)
