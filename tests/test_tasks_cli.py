"""``nestlearn tasks``: list, run (files written, runs reused, settings respected), bad input."""

from __future__ import annotations

import json

import pytest

from nestlearn.cli import main

RUN = ["tasks", "run", "parity", "--quick", "--steps", "2", "--archs", "transformer", "titans",
       "--seeds", "0", "1"]


def test_tasks_list_names_every_task_and_group(capsys):
    assert main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("mqar", "s-niah-1", "s-niah-2", "s-niah-3", "parity", "aa-star", "abab-star",
                 "anbn", "anbncn", "shuffle-2", "copy", "formal", "s-niah"):
        assert name in out


def test_tasks_run_writes_json_markdown_plots_and_reuses_runs(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert main([*RUN, "--set", "memory.chunk_size=8", "--out", str(out)]) == 0
    folder = out / "parity"
    results = json.loads((folder / "results.json").read_text())
    assert [(r["arch"], r["seed"]) for r in results["runs"]] == [
        ("transformer", 0), ("transformer", 1), ("titans", 0), ("titans", 1)]
    assert results["models"]["titans"]["memory"]["chunk_size"] == 8
    assert results["budget"]["steps"] == 2
    table = results["tables"][0]
    assert table["title"] == "accuracy by string length" and table["chance"] == 0.5
    assert [row["label"] for row in table["rows"]] == ["1-16 (train)", "17-32", "33-64"]
    cell = table["rows"][0]["archs"]["titans"]
    assert cell["seeds"] == [0, 1] and len(cell["values"]) == 2
    assert all(0.0 <= v <= 1.0 for v in cell["values"])
    text = (folder / "results.md").read_text()
    assert "nestlearn tasks run parity --archs transformer titans --seeds 0 1 --steps 2" in text
    assert "| 1-16 (train) |" in text
    assert (folder / "accuracy-by-string-length.png").stat().st_size > 0
    gates = results["runs"][2]["gates"]  # titans: its memories' gates; the transformer has none
    assert [g["chunk_size"] for g in gates] == [8, 8] and "gates" not in results["runs"][0]
    assert "## memory gates" in text
    capsys.readouterr()

    # same settings: every run is reused; a third seed of one arch joins the report
    assert main([*RUN, "--set", "memory.chunk_size=8", "--out", str(out)]) == 0
    assert capsys.readouterr().err.count("reusing") == 4
    first = json.loads((folder / "runs" / "transformer-seed0.json").read_text())
    assert main(["tasks", "run", "parity", "--quick", "--steps", "2", "--archs", "transformer",
                 "titans", "--seeds", "0", "--set", "memory.chunk_size=8", "--retrain",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "reusing" not in err and "[parity] transformer seed 0: step 2/2" in err
    again = json.loads((folder / "runs" / "transformer-seed0.json").read_text())
    assert again["losses"] == first["losses"]  # the same seed trains the same model
    assert main(["tasks", "run", "parity", "--quick", "--steps", "2", "--archs", "titans",
                 "--seeds", "2", "--set", "memory.chunk_size=8", "--out", str(out)]) == 0
    results = json.loads((folder / "results.json").read_text())
    assert [(r["arch"], r["seed"]) for r in results["runs"]] == [
        ("transformer", 0), ("transformer", 1), ("titans", 0), ("titans", 1), ("titans", 2)]
    # other settings: the stored runs no longer match, so only the new one is reported
    assert main(["tasks", "run", "parity", "--quick", "--steps", "3", "--archs", "transformer",
                 "--seeds", "0", "--out", str(out)]) == 0
    results = json.loads((folder / "results.json").read_text())
    assert [(r["arch"], r["seed"]) for r in results["runs"]] == [("transformer", 0)]


@pytest.mark.parametrize("args, message", [
    (["nope"], "task: got 'nope'"),
    (["parity", "--archs", "gpt"], "--archs: got 'gpt'"),
    (["parity", "--seeds", "-1"], "--seeds: got [-1]"),
    (["parity", "--steps", "0"], "--steps: got 0"),
    (["mqar", "--corpus", "wiki"], "--corpus: got 'wiki'"),
    (["parity", "--set", "dim"], "--set: got 'dim'"),
    (["parity", "--archs", "transformer", "--set", "memory.depth=3"], "no arch"),
])
def test_tasks_run_refuses_bad_input_with_one_line(tmp_path, capsys, args, message):
    assert main(["tasks", "run", *args, "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
