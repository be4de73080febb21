"""results.json round trip, aggregation over seeds and the rendered report (table and PNGs),
on a hand-made suite of 2 methods x 1 arch x 2 seeds x 3 tasks."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest

from nestlearn.continual import report
from nestlearn.errors import NestlearnError

MATRICES = {
    ("finetune", 0): [[0.8, 0.1, 0.1], [0.4, 0.9, 0.1], [0.2, 0.3, 0.9]],
    ("finetune", 1): [[0.7, 0.1, 0.1], [0.3, 0.8, 0.1], [0.1, 0.2, 0.9]],
    ("replay", 0): [[0.8, 0.1, 0.1], [0.7, 0.9, 0.1], [0.6, 0.8, 0.9]],
    ("replay", 1): [[0.8, 0.1, 0.1], [0.7, 0.8, 0.1], [0.5, 0.7, 0.9]],
}
WALL = {0: 10.0, 1: 14.0}
RATE = {0: 1000.0, 1: 1200.0}
ENERGY = {0: 150.0, 1: 210.0}


def make_row(method: str, seed: int) -> dict:
    R = MATRICES[(method, seed)]
    row = {
        "method": method, "arch": "hope", "seed": seed, "R": R,
        "R_loss": [[3.0 - 2.0 * v for v in line] for line in R],
        "baseline": [0.1, 0.1, 0.1], "baseline_loss": [3.0, 3.0, 3.0],
        "curve": [{"step": s, "task": s // 2, "loss": 3.0 - 0.3 * s - 0.1 * seed}
                  for s in range(6)],
        "resources": {"wall_s": WALL[seed], "tokens": 12000, "tokens_per_s": RATE[seed],
                      "peak_rss_mb": 500.0, "energy_j": ENERGY[seed],
                      "energy_source": "estimate: cpu time x 15 W per core"},
        "extras": {},
    }
    if method == "replay" and seed == 0:
        row["extras"]["monitor"] = [
            {"step": s, "level": level, "drift": 0.1 * s, "update_norm": 1.0 + level,
             "surprise": 2.0 - 0.1 * s, "guard_loss": None, "event": "drift" if s == 3 else None}
            for s in range(6) for level in (0, 1)]
    return row


def make_results() -> dict:
    return {
        "format_version": 1,
        "stream": {"name": "tiny", "kind": "lm", "tasks": ["a", "b", "c"],
                   "description": "three tiny tasks", "seq_len": 8, "vocab_size": 17,
                   "score_name": "accuracy", "loss_name": "loss"},
        "config": {"steps_per_task": 2, "lr": 0.01},
        "seeds": [0, 1],
        "versions": {"nestlearn": "0"},
        "machine": {"cpus": 2},
        "rows": [make_row(method, seed) for method in ("finetune", "replay") for seed in (0, 1)],
    }


def test_aggregate_means_and_stds_over_seeds() -> None:
    summary = report.aggregate(make_results())
    assert [(g["method"], g["arch"], g["seeds"]) for g in summary] == [
        ("finetune", "hope", [0, 1]), ("replay", "hope", [0, 1])]
    fine, replay = summary
    acc = fine["metrics"]["average_accuracy"]
    assert acc["mean"] == pytest.approx((1.4 / 3 + 1.2 / 3) / 2)
    assert acc["std"] == pytest.approx(abs(1.4 / 3 - 1.2 / 3) / math.sqrt(2))
    assert (acc["min"], acc["max"], acc["n"]) == (pytest.approx(1.2 / 3), pytest.approx(1.4 / 3), 2)
    assert replay["metrics"]["average_accuracy"]["mean"] == pytest.approx((2.3 / 3 + 2.1 / 3) / 2)
    # BWT: finetune s0 ((0.2-0.8)+(0.3-0.9))/2, s1 ((0.1-0.7)+(0.2-0.8))/2
    assert fine["metrics"]["backward_transfer"]["mean"] == pytest.approx(-0.6)
    assert fine["metrics"]["backward_transfer"]["std"] == pytest.approx(0.0, abs=1e-12)
    # loss = 3 - 2 R, so the mean final loss is 3 - 2 * mean final accuracy
    assert fine["metrics"]["loss_average"]["mean"] == pytest.approx(3 - 2 * acc["mean"])
    assert fine["resources"]["wall_s"]["mean"] == pytest.approx(12.0)
    assert fine["resources"]["wall_s"]["std"] == pytest.approx(4.0 / math.sqrt(2))
    assert fine["energy_source"] == "estimate: cpu time x 15 W per core"
    assert fine["R_mean"][2] == pytest.approx([0.15, 0.25, 0.9])
    assert replay["R_loss_mean"][0][0] == pytest.approx(3 - 2 * 0.8)


def test_report_table_numbers_and_pngs(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    path = report.write_report(tmp_path, make_results())
    assert path == tmp_path / "report.md"
    text = path.read_text()
    table = [line for line in text.splitlines() if line.startswith("| finetune | hope | 2 |")]
    assert len(table) == 2  # the headline and the loss table
    mean = (1.4 / 3 + 1.2 / 3) / 2
    std = abs(1.4 / 3 - 1.2 / 3) / math.sqrt(2)
    assert f"{mean:.3f} ± {std:.3f} ({1.2 / 3:.3f}–{1.4 / 3:.3f})" in table[0]
    assert "-0.600 ± 0.000" in table[0]
    assert "12.0 ± 2.8" in table[0] and "1100 ± 141" in table[0]
    assert "180.0 ± 42.4" in table[0] and "estimate: cpu time x 15 W per core" in table[0]
    assert f"{3 - 2 * mean:.3f} ± {2 * std:.3f}" in table[1]
    assert "loss BWT > 0 means old tasks got worse" in text
    assert "BWT < 0 means old tasks got worse" in text
    assert "| after c | 0.150 | 0.250 | 0.900 |" in text  # finetune's mean R, last stage
    for name in ("heatmaps", "forgetting", "task_loss", "training_loss", "monitor"):
        png = tmp_path / f"{name}.png"
        assert f"]({name}.png)" in text
        image = plt.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    path = report.write_report(tmp_path, make_results())
    text = path.read_text()
    assert "Plots skipped: matplotlib is not installed" in text
    assert "| replay | hope | 2 |" in text
    assert list(tmp_path.glob("*.png")) == []


def test_no_loss_matrix_no_monitor_one_seed(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    results = make_results()
    results["rows"] = [results["rows"][0]]
    del results["rows"][0]["R_loss"]
    text = report.write_report(tmp_path, results).read_text()
    assert f"| finetune | hope | 1 | {1.4 / 3:.3f} | -0.600 |" in text
    assert "Loss-based metrics" not in text
    headline = text.split("## Headline")[1].split("## ")[0]
    assert "±" not in headline and "(n=" not in headline


def test_save_load_round_trip_writes_nan_as_null(tmp_path: Path) -> None:
    results = make_results()
    results["rows"][0]["metrics"] = {"backward_transfer": math.nan, "bits_per_byte": 1.25}
    path = report.save_results(tmp_path / "out", results)
    raw = path.read_text()
    assert "NaN" not in raw
    assert json.loads(raw)["rows"][0]["metrics"]["backward_transfer"] is None
    loaded = report.load_results(path)
    assert loaded["rows"][1]["R"] == MATRICES[("finetune", 1)]
    fine = report.aggregate(loaded)[0]
    # the row's own null counts as missing: one seed left for BWT; extra keys come through
    assert fine["metrics"]["backward_transfer"]["n"] == 1
    assert fine["metrics"]["bits_per_byte"]["mean"] == pytest.approx(1.25)
    assert not list((tmp_path / "out").glob(".*tmp"))


@pytest.mark.parametrize("change, pattern", [
    (lambda r: r.update(format_version=2), "format_version: got 2; allowed: 1"),
    (lambda r: r.update(rows=[]), "rows: got"),
    (lambda r: r["rows"][0].pop("method"), r"rows\[0\].method"),
    (lambda r: r["rows"][1].update(seed="1"), r"rows\[1\].seed"),
    (lambda r: r["rows"][2].update(R=[[0.5, 0.5], [0.5, 0.5]]), "R sizes"),
    (lambda r: r["rows"][3].update(R=[[0.5, 0.5, 0.5]]), r"rows\[3\].R: got shape"),
])
def test_bad_results(tmp_path: Path, change: object, pattern: str) -> None:
    results = copy.deepcopy(make_results())
    change(results)  # type: ignore[operator]
    with pytest.raises(NestlearnError, match=pattern):
        report.aggregate(results)
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(NestlearnError, match=pattern):
        report.load_results(tmp_path / "results.json")


def test_load_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(NestlearnError, match="does not exist"):
        report.load_results(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(NestlearnError, match="not JSON"):
        report.load_results(tmp_path / "bad.json")
