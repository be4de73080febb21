"""``nestlearn continual`` and ``nestlearn ablate`` end to end on tiny streams and tasks."""

from __future__ import annotations

import json

import pytest

from nestlearn.cli import main

TINY = ["--size", "examples_per_class=6", "--steps", "2", "--batch-size", "4",
        "--eval-budget", "8", "--seeds", "0"]


def test_list_names_streams_methods_and_archs(capsys):
    assert main(["continual", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("domain-lm", "split-digits", "regime-shift", "online-ewc", "lwf", "nested",
                 "hope-stacked"):
        assert name in out


def test_run_writes_the_report_then_reuses_its_rows(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["continual", "run", "--stream", "split-digits", "--methods", "finetune,replay",
            "--archs", "transformer", "--row", "nested/titans", "--option",
            "replay.buffer_size=16", "--monitor-every", "1", "--out", str(out), *TINY]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {(row["method"], row["arch"]): row for row in results["rows"]}
    assert set(rows) == {("finetune", "transformer"), ("replay", "transformer"),
                         ("nested", "titans")}
    for row in rows.values():
        assert len(row["R"]) == 5 and all(len(r) == 5 for r in row["R"])
        assert row["extras"]["monitor"], "every row was monitored"
    assert rows[("replay", "transformer")]["extras"]["spec"]["options"]["buffer_size"] == 16
    assert rows[("nested", "titans")]["extras"]["state_policy"] == "carry"
    assert (out / "report.md").exists() and len(list((out / "rows").glob("*.json"))) == 3
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("reusing") == 3
    again = json.loads((out / "results.json").read_text())
    assert [row["R"] for row in again["rows"]] == [row["R"] for row in results["rows"]]
    # another step count is another row: trained again, not reused
    assert main([*argv[:-len(TINY)], *TINY[:2], "--steps", "3", *TINY[4:]]) == 0
    assert "reusing" not in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--stream", "nope"], "--stream: got 'nope'"),
    (["--stream", "split-digits", "--methods", "finetune", "--option", "ewc.lambda=1"],
     "methods ['ewc'] are not run"),
    (["--stream", "split-digits", "--option", "lambda=1"], "METHOD.KEY=VALUE"),
    (["--stream", "split-digits", "--option", "finetune.lr=1"], "unknown ['lr']"),
    (["--stream", "split-digits", "--rollback-threshold", "0.1"], "needs --monitor-every"),
    (["--stream", "split-digits", "--row", "nested"], "METHOD/ARCH"),
    (["--stream", "split-digits", "--lr", "fast"], "--lr: got 'fast'"),
    (["--stream", "split-digits", "--size", "colours=3"], "colours"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys, argv, message):
    code = main(["continual", "run", *argv, "--out", str(tmp_path / "x"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x" / "results.json").exists()


def test_a_bad_stream_file_is_refused_before_anything_trains(tmp_path, capsys):
    folder = tmp_path / "legal"
    folder.mkdir()
    (folder / "a.txt").write_text("some text\n")
    stream = tmp_path / "stream.toml"
    stream.write_text('name = "mine"\nkind = "lm"\n[[tasks]]\nname = "legal"\n'
                      f'paths = ["{folder}", "{tmp_path / "missing"}"]\n')
    code = main(["continual", "run", "--stream", str(stream), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "missing" in err and "legal" in err


def test_ablate_a_stream_writes_the_table_of_every_variant(tmp_path, capsys):
    out = tmp_path / "ablate"
    code = main(["ablate", "--stream", "regime-shift", "--size", "segment_len=160",
                 "--size", "eval_len=96", "--arch", "titans", "--variants",
                 "no-momentum,no-weight-decay", "--steps", "2", "--batch-size", "2",
                 "--eval-budget", "64", "--seeds", "0", "--out", str(out)])
    assert code == 0
    table = (out / "ablation.md").read_text()
    for name in ("| base |", "| no-momentum |", "| no-weight-decay |", "loss_average"):
        assert name in table
    data = json.loads((out / "ablation.json").read_text())
    assert [e["variant"] for e in data["entries"]] == ["base", "no-momentum",
                                                        "no-weight-decay"]
    results = json.loads((out / "results.json").read_text())
    models = {row["arch"]: row["extras"]["model"]["memory"] for row in results["rows"]}
    assert models["titans"]["momentum"] and not models["titans:no-momentum"]["momentum"]
    assert not models["titans:no-weight-decay"]["weight_decay"]
    for row in results["rows"]:  # forecasting rows carry the online shift metrics
        assert {"shift_error", "readapt_steps", "recurrence_speedup"} <= set(row["metrics"])


def test_ablate_refuses_a_variant_the_arch_lacks(tmp_path, capsys):
    code = main(["ablate", "--task", "parity", "--arch", "transformer", "--variants",
                 "no-dgd", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "'no-dgd' does not fit arch 'transformer'" in err


def test_a_stream_file_of_class_folders_runs(tmp_path):
    for task, classes in (("animals", ("cat", "dog")), ("tools", ("saw", "drill"))):
        for name in classes:
            folder = tmp_path / task / name
            folder.mkdir(parents=True)
            for index in range(4):
                (folder / f"{index}.txt").write_text(f"a {name} text number {index}\n")
    stream = tmp_path / "stream.json"
    stream.write_text(json.dumps({"name": "mine", "kind": "classification", "seq_len": 32,
                                  "tasks": [{"name": "animals", "paths": ["animals"]},
                                            {"name": "tools", "paths": ["tools"]}]}))
    out = tmp_path / "out"
    assert main(["continual", "run", "--stream", str(stream), "--methods", "finetune",
                 "--archs", "transformer", "--steps", "2", "--batch-size", "2",
                 "--seeds", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stream"]["tasks"] == ["animals", "tools"]
    assert len(results["rows"][0]["R"]) == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "parity", "--steps", "5"], "--steps: not used with --task"),
    (["--task", "parity", "--method", "finetune", "--lr", "0.01"],
     "--method, --lr: not used with --task"),
    (["--stream", "split-digits", "--quick"], "--quick: not used with --stream"),
])
def test_ablate_refuses_the_other_modes_options(tmp_path, capsys, argv, message):
    assert main(["ablate", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
