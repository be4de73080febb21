"""Levels of a model that keeps learning: snapshot, rollback, freeze, reset, and the stream
monitor (records, guard-loss rollback, runner callback, JSON lines and plot)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nestlearn.continual.levels import (
    freeze,
    frozen_levels,
    hold_frozen,
    model_levels,
    remember_initial,
    reset,
    rollback,
    snapshot,
    unfreeze,
)
from nestlearn.continual.monitor import RECORD_FIELDS, StreamMonitor, guard_loss, plot_monitor
from nestlearn.errors import NestlearnError
from nestlearn.models import ModelConfig, build_model
from nestlearn.optim import MultiFrequency
from nestlearn.state import tensors

VOCAB = 32
ARCHS = ("hope", "titans", "transformer")


def tiny(arch: str, layers: int = 2, seed: int = 0):
    sections = {
        "hope": {"memory": {"chunk_size": 8, "inner_chunk_size": 8},
                 "cms": {"chunk_sizes": (8, 16), "inner_lr": 0.05}},
        "titans": {"memory": {"chunk_size": 8}},
        "transformer": {},
    }[arch]
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, vocab_size=VOCAB, dim=16, layers=layers, heads=2,
                                   **sections))


def batch(seed: int, rows: int = 2, length: int = 17) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def train_step(model, optimizer, state, seed: int):
    """One step on a fresh batch, the state carried (detached) to the next step."""
    ids = batch(seed)
    logits, state = model(ids[:, :-1], state)
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return state.detach(), loss.detach()


def level_values(model, state, level):
    """The level's tensors as a flat list: its parameters, or every tensor of its state part
    (weights, momentum, gradient sum)."""
    if level.kind == "parameters":
        return [p.detach().clone() for p in level.parameters(model).values()]
    return [t.clone() for t in tensors(level.read_state(model, state))]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_levels_name_cms_levels_memory_and_state_levels():
    names = {arch: [(lv.name, lv.kind, lv.period) for lv in model_levels(tiny(arch))]
             for arch in ARCHS}
    hope = names["hope"]
    for block in (0, 1):
        for k, chunk in enumerate((8, 16)):
            assert (f"blocks.{block}.cms.level{k}", "parameters", chunk) in hope
            assert (f"blocks.{block}.cms.level{k}.state", "state", chunk) in hope
        assert (f"blocks.{block}.memory.state", "state", 8) in hope
        assert (f"blocks.{block}.memory.inner.state", "state", 8) in hope
        assert (f"blocks.{block}.memory.initial", "parameters", None) in hope
        assert (f"blocks.{block}.memory.projections", "parameters", None) in hope
        assert (f"blocks.{block}.memory.state", "state", 8) in names["titans"]
    assert not any("cms" in name for name, _, _ in names["titans"])
    assert names["transformer"] == [("io", "parameters", None),
                                    ("blocks.0.rest", "parameters", None),
                                    ("blocks.1.rest", "parameters", None)]
    for arch in ARCHS:
        model = tiny(arch)
        claimed = [n for level in model_levels(model) for n in level.parameter_names]
        assert sorted(claimed) == sorted(n for n, _ in model.named_parameters())


def test_cms_level_parameters_and_state_are_the_levels_own():
    model = tiny("hope", layers=1)
    level = next(lv for lv in model_levels(model) if lv.name == "blocks.0.cms.level1")
    cms = model.backbone.blocks[0].cms
    assert set(level.parameters(model).values()) == {
        cms.initial[1].w_gate, cms.initial[1].w_up, cms.initial[1].w_down,
        cms.norms[1].weight, cms.local_targets["1"]}
    state = model.init_state(2)
    fast = next(lv for lv in model_levels(model) if lv.name == "blocks.0.cms.level1.state")
    assert fast.read_state(model, state) is state.blocks[0].cms.levels[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_rollback_restores_parameters_and_state_bit_for_bit(arch):
    model = tiny(arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state, _ = train_step(model, optimizer, None, seed=0)
    levels = model_levels(model)
    before = {lv.name: level_values(model, state, lv) for lv in levels}
    snap = snapshot(model, state)
    for step in range(1, 4):
        state, _ = train_step(model, optimizer, state, seed=step)
    moved = [lv.name for lv in levels if not same(before[lv.name], level_values(model, state, lv))]
    assert "io" in moved and any(name.endswith(".rest") for name in moved)
    if arch != "transformer":
        assert "blocks.0.memory.state" in moved
    trained = state
    restored = rollback(model, state, snap, [lv.name for lv in levels])
    for level in levels:
        assert same(level_values(model, restored, level), before[level.name]), level.name
    # the state passed in is left alone, and the rest of the state (KV caches, pending
    # tokens, positions) is the trained one
    assert restored.position == trained.position
    if arch == "transformer":
        assert all(torch.equal(a, b) for a, b in zip(tensors(restored), tensors(trained),
                                                      strict=True))


def test_rollback_of_some_levels_leaves_the_others():
    model = tiny("hope")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state, _ = train_step(model, optimizer, None, seed=0)
    snap = snapshot(model, state)
    levels = {lv.name: lv for lv in model_levels(model)}
    chosen = ["blocks.1.cms.level0", "blocks.0.memory.state"]
    saved = {name: level_values(model, state, levels[name]) for name in chosen}
    for step in range(1, 4):
        state, _ = train_step(model, optimizer, state, seed=step)
    after = {name: level_values(model, state, lv) for name, lv in levels.items()}
    restored = rollback(model, state, snap, chosen)
    for name, level in levels.items():
        expected = saved[name] if name in chosen else after[name]
        assert same(level_values(model, restored, level), expected), name


@pytest.mark.parametrize("optimizer_kind", ["adamw", "multifrequency-sgd"])
def test_frozen_level_does_not_move_while_others_do(optimizer_kind):
    model = tiny("hope", layers=1)
    if optimizer_kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                      betas=(0.9, 0.99))
    else:
        # gathered gradient sums and momentum would still move a parameter without the hook
        optimizer = MultiFrequency(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9,
                                                   weight_decay=0.1), periods=[2])
    state = None
    for step in range(3):  # moments, momentum buffers and gradient sums exist before freezing
        state, _ = train_step(model, optimizer, state, seed=step)
    levels = {lv.name: lv for lv in model_levels(model)}
    chosen = ["blocks.0.cms.level0", "blocks.0.memory.projections", "blocks.0.cms.level0.state"]
    kept = {name: level_values(model, state, levels[name]) for name in chosen}
    others = {name: level_values(model, state, lv) for name, lv in levels.items()
              if name not in chosen}
    try:
        freeze(model, chosen, state)
        assert frozen_levels(model) == tuple(n for n in levels if n in chosen)
        assert not any(p.requires_grad for p in levels[chosen[0]].parameters(model).values())
        for step in range(3, 8):
            state, _ = train_step(model, optimizer, state, seed=step)
            for param in levels[chosen[1]].parameters(model).values():
                param.grad = torch.ones_like(param)  # a stale gradient cannot move it either
            optimizer.step()
            state = hold_frozen(model, state)
        for name in chosen:
            assert same(level_values(model, state, levels[name]), kept[name]), name
        moved = [name for name, values in others.items()
                 if not same(level_values(model, state, levels[name]), values)]
        assert {"io", "blocks.0.cms.level1", "blocks.0.memory.state",
                "blocks.0.cms.level1.state"} <= set(moved)
    finally:
        unfreeze(model, chosen)
    assert frozen_levels(model) == ()
    assert all(p.requires_grad for p in levels[chosen[0]].parameters(model).values())
    train_step(model, optimizer, state, seed=9)
    assert not same(level_values(model, state, levels[chosen[0]]), kept[chosen[0]])


def test_reset_gives_init_state_values_and_initial_parameters():
    model = tiny("hope", layers=1)
    initial = remember_initial(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state = None
    for step in range(3):
        state, _ = train_step(model, optimizer, state, seed=step)
    levels = {lv.name: lv for lv in model_levels(model)}
    names = ["blocks.0.memory.state", "blocks.0.cms.level1.state", "blocks.0.cms.level0"]
    fresh = model.init_state(2)
    assert not same(level_values(model, state, levels[names[0]]),
                    level_values(model, fresh, levels[names[0]]))
    new = reset(model, state, names)
    for name in names[:2]:
        assert same(level_values(model, new, levels[name]),
                    level_values(model, fresh, levels[name])), name
    values = level_values(model, new, levels[names[2]])
    assert same(values, list(initial.parameters[names[2]].values()))
    # a level not named is untouched
    assert same(level_values(model, new, levels["blocks.0.memory.inner.state"]),
                level_values(model, state, levels["blocks.0.memory.inner.state"]))


def test_bad_level_names_and_arguments_are_refused():
    model = tiny("titans", layers=1)
    with pytest.raises(NestlearnError, match=r"level: got 'blocks\.0\.cms\.level0'"):
        snapshot(model, None, ["blocks.0.cms.level0"])
    with pytest.raises(NestlearnError, match="state"):
        snapshot(model, None, ["blocks.0.memory.state"])
    with pytest.raises(NestlearnError, match="initial"):
        reset(tiny("transformer", layers=1), None, ["io"])
    with pytest.raises(NestlearnError, match="rollback_threshold"):
        StreamMonitor(model, every=1, rollback_threshold=0.1)
    with pytest.raises(NestlearnError, match="rollback"):
        StreamMonitor(tiny("transformer", layers=1), batch(0), rollback="fastest")
    snap = snapshot(model, None, ["io"])
    with pytest.raises(NestlearnError, match="snapshot"):
        rollback(model, None, snap, ["blocks.0.rest"])


def run_stream(model, monitor, steps: int, corrupt_at: int | None = None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state = None
    for step in range(steps):
        state, loss = train_step(model, optimizer, state, seed=100 + step)
        if step == corrupt_at:
            with torch.no_grad():
                model.backbone.embed.weight.mul_(8.0)
        state = monitor.observe(step, model, state, loss)
    return state


@pytest.mark.parametrize("arch", ARCHS)
def test_monitor_records_drift_update_norm_surprise_and_guard(arch):
    model = tiny(arch, layers=1)
    monitor = StreamMonitor(model, batch(7), every=2)
    run_stream(model, monitor, steps=5)
    records = monitor.records
    assert {r["step"] for r in records} == {0, 2, 4}
    assert all(set(r) == set(RECORD_FIELDS) for r in records)
    names = [lv.name for lv in model_levels(model)]
    assert [r["level"] for r in records if r["step"] == 0] == names
    first = [r for r in records if r["step"] == 0]
    assert all(r["drift"] == 0.0 and r["update_norm"] == 0.0 and r["event"] == "snapshot"
               for r in first)
    later = {r["level"]: r for r in records if r["step"] == 2}
    assert later["io"]["drift"] > 0 and later["io"]["update_norm"] > 0
    assert all(r["guard_loss"] > 0 and r["surprise"] > 0 for r in records)
    if arch != "transformer":
        memory = later["blocks.0.memory.state"]
        assert memory["drift"] > 0 and memory["memory_surprise"] > 0
    if arch == "hope":
        assert later["blocks.0.cms.level0.state"]["drift"] > 0


def test_records_are_written_as_json_lines_and_plotted(tmp_path):
    model = tiny("titans", layers=1)
    monitor = StreamMonitor(model, batch(7), every=1, rollback_threshold=0.05)
    run_stream(model, monitor, steps=4, corrupt_at=2)
    assert [e["event"] for e in monitor.events].count("rollback") == 1
    lines = monitor.to_jsonl(tmp_path / "monitor.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == monitor.records
    png = plot_monitor(monitor.records, tmp_path / "monitor.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(NestlearnError, match="records"):
        plot_monitor([], tmp_path / "empty.png")


def test_drift_is_measured_from_the_last_accepted_snapshot():
    model = tiny("hope", layers=1)
    monitor = StreamMonitor(model, batch(7), every=1, snapshot_every=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    io = next(lv for lv in model_levels(model) if lv.name == "io")
    state, seen = None, []
    for step in range(4):
        state, loss = train_step(model, optimizer, state, seed=100 + step)
        state = monitor.observe(step, model, state, loss)
        seen.append(torch.cat([p.detach().flatten() for p in io.parameters(model).values()]))
    rows = [r for r in monitor.records if r["level"] == "io"]
    assert [r["event"] for r in rows] == ["snapshot", None, None, "snapshot"]
    for step in (1, 2, 3):  # drift from the step-0 snapshot, update norm from the step before
        drift = float((seen[step].double() - seen[0].double()).norm() / seen[0].double().norm())
        update = float((seen[step].double() - seen[step - 1].double()).norm())
        assert rows[step]["drift"] == pytest.approx(drift, rel=1e-9)
        assert rows[step]["update_norm"] == pytest.approx(update, rel=1e-9)
    assert rows[1]["drift"] < rows[2]["drift"]
    monitor.take_snapshot(state, step=3)
    again = monitor.observe(4, model, state, None)
    assert again is state
    assert all(r["drift"] == 0.0 and r["update_norm"] == 0.0
               for r in monitor.records if r["step"] == 4)


def test_a_guard_loss_rise_rolls_the_parameters_back_and_is_logged():
    model = tiny("hope", layers=1)
    guard = batch(7)
    monitor = StreamMonitor(model, guard, every=2, rollback_threshold=0.05)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = None
    for step in range(6):
        state, loss = train_step(model, optimizer, state, seed=100 + step)
        state = monitor.observe(step, model, state, loss)
    accepted = monitor.snapshot
    reference = monitor.reference
    with torch.no_grad():
        model.backbone.embed.weight.mul_(8.0)  # corrupt: the guard loss jumps
    corrupted = guard_loss(model, guard)
    assert corrupted > reference * 1.05
    state = monitor.observe(6, model, state, None)
    event = monitor.events[-1]
    assert event["event"] == "rollback" and event["step"] == 6
    assert event["guard_loss"] == corrupted and event["reference"] == reference
    assert event["guard_after"] == reference
    assert "io" in event["levels"]
    assert not any(name.endswith(".state") for name in event["levels"])
    assert monitor.snapshot is accepted  # the snapshot is kept
    for name, values in accepted.parameters.items():
        params = dict(model.named_parameters())
        assert all(torch.equal(params[p], v) for p, v in values.items()), name
    rows = [r for r in monitor.records if r["step"] == 6]
    assert {r["level"] for r in rows if r["event"] == "rollback"} == set(event["levels"])


def test_fastest_rollback_restores_only_the_shortest_period_levels():
    model = tiny("hope", layers=1)
    monitor = StreamMonitor(model, batch(7), every=1, rollback_threshold=0.0,
                            rollback="fastest")
    assert {lv.period for lv in monitor.rollback_levels} == {8}
    assert {lv.name for lv in monitor.rollback_levels} >= {"blocks.0.cms.level0",
                                                          "blocks.0.cms.level0.state"}
    state = run_stream(model, monitor, steps=1)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    monitor.observe(1, model, state, None)
    event = monitor.events[-1]
    assert event["event"] == "rollback"
    assert set(event["levels"]) == {lv.name for lv in monitor.rollback_levels}


def test_monitor_as_runner_callback_returns_a_replacement_state_only_when_needed():
    model = tiny("hope", layers=1)
    monitor = StreamMonitor(model, batch(7), every=1, rollback_threshold=0.05, rollback="all")
    callback = monitor.as_callback()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state, loss = train_step(model, optimizer, None, seed=0)
    info = SimpleNamespace(step=0, task_index=0, model=model, state=state, loss=loss)
    assert callback(info) is None
    memory = next(lv for lv in model_levels(model) if lv.name == "blocks.0.memory.state")
    saved = level_values(model, state, memory)
    state, loss = train_step(model, optimizer, state, seed=1)
    with torch.no_grad():
        model.backbone.embed.weight.mul_(8.0)
    replacement = callback(SimpleNamespace(step=1, task_index=0, model=model, state=state,
                                           loss=loss))
    assert replacement is not None and replacement is not state
    assert same(level_values(model, replacement, memory), saved)
    assert all(r["task"] == 0 for r in monitor.records)


def test_monitor_holds_frozen_state_levels_every_step():
    model = tiny("titans", layers=1)
    monitor = StreamMonitor(model, batch(7), every=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state, _ = train_step(model, optimizer, None, seed=0)
    memory = next(lv for lv in model_levels(model) if lv.name == "blocks.0.memory.state")
    kept = level_values(model, state, memory)
    freeze(model, [memory.name], state)
    try:
        for step in range(1, 4):
            state, loss = train_step(model, optimizer, state, seed=step)
            state = monitor.observe(step, model, state, loss)
            assert same(level_values(model, state, memory), kept)
    finally:
        unfreeze(model, [memory.name])
