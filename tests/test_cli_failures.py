"""Bad paths and refused runs from the command line: one line each, nothing left behind, and
eval/generate reading the previous good checkpoint when the latest is damaged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nestlearn.cli import main
from nestlearn.training import checkpoint as ckpt
from nestlearn.training import train
from trainkit import tiny_config, tiny_sets, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ALLOWED_RUN = "allowed: a folder written by `nestlearn train`, or one of its checkpoints"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt", paragraphs=80)


@pytest.fixture(scope="module")
def run_with_two_checkpoints(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_config(corpus, run, "train.steps=3", "train.checkpoint_every=1"), progress=False)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000003"]
    return run


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("content", "expected"), [
    (None, "corpus: '/dev/null' is not a regular file or folder (a device, pipe or socket); "
           "allowed: a text file or a folder of .txt/.md files"),
    ("", "corpus: file 'CORPUS' is empty (no text); allowed: a UTF-8 text file of "
         "blank-line separated documents"),
    (" \n\n\t\n", "corpus: file 'CORPUS' is empty (no text); allowed: a UTF-8 text file of "
                  "blank-line separated documents"),
])
def test_an_empty_corpus_is_one_clear_line_and_leaves_no_run_folder(tmp_path, capsys, content,
                                                                    expected):
    corpus = "/dev/null"
    if content is not None:
        corpus = str(tmp_path / "corpus.txt")
        (tmp_path / "corpus.txt").write_text(content)
    out = tmp_path / "runs" / "new"
    assert main(["train", "--out", str(out), "--no-progress",
                 *tiny_sets(f"data.corpus={corpus}")]) == 2
    assert _one_line(capsys) == f"nestlearn train: error: {expected.replace('CORPUS', corpus)}"
    assert not (tmp_path / "runs").exists()  # neither the run folder nor the parent it made


def test_a_run_refused_after_its_folder_was_made_leaves_nothing_behind(corpus, tmp_path,
                                                                       capsys):
    # the memory check runs after the data was tokenized into RUN/data
    out = tmp_path / "new" / "run"
    assert main(["train", "--out", str(out), "--no-progress",
                 *tiny_sets(f"data.corpus={corpus}", "data.batch_size=1000000",
                            "data.seq_len=1000000")]) == 2
    assert "a training step needs about" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []
    # a folder that existed before keeps what it held
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(["train", "--out", str(kept), "--no-progress",
                 *tiny_sets(f"data.corpus={corpus}", "data.batch_size=1000000",
                            "data.seq_len=1000000")]) == 2
    assert "a training step needs about" in _one_line(capsys)
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_run_dir_that_is_not_a_run_is_named_for_what_it_is(corpus, tmp_path, capsys,
                                                             command):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text("{}")
    cases = {
        a_file: f"run folder '{a_file}' is a file, not a folder; {ALLOWED_RUN}",
        empty: f"run folder '{empty}' is empty; {ALLOWED_RUN}",
        other: f"run folder '{other}' is not a training run (no config.json, no "
               f"checkpoints/); {ALLOWED_RUN}",
        started: f"run folder '{started}' has no checkpoint yet (training writes one every "
                 "train.checkpoint_every steps and at the end)",
        tmp_path / "missing": f"run folder '{tmp_path / 'missing'}' does not exist",
    }
    for run_dir, expected in cases.items():
        assert main([command, str(run_dir)]) == 2
        assert _one_line(capsys) == f"nestlearn {command}: error: {expected}"


@pytest.mark.parametrize(("args", "expected"), [
    (["demo", "--quick", "--out", "", "--steps", "1"],
     "--out: got ''; allowed: a folder path (not empty)"),
    (["demo", "--out", " ", "--steps", "1"], "--out: got ' '; allowed: a folder path (not empty)"),
    (["demo", "--steps", "0"], "--steps: got 0; allowed: an integer >= 1"),
    (["demo", "--set", "train.steps=2"], "--set: only with --quick (the single-model demo); "
     "the default demo trains a fixed set of rows"),
    (["train", "--no-progress", "--set", "train.out_dir="],
     "--set train.out_dir=: train.out_dir: got ''; allowed: a directory path"),
])
def test_an_empty_output_folder_is_refused_in_one_line(tmp_path, monkeypatch, capsys, args,
                                                       expected):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert _one_line(capsys) == f"nestlearn {args[0]}: error: {expected}"
    assert list(tmp_path.iterdir()) == []


def _damage(checkpoint) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])


def test_eval_and_generate_fall_back_to_the_previous_good_checkpoint(
        run_with_two_checkpoints, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_with_two_checkpoints, run)
    latest, previous = ckpt.checkpoint_dir(run, 3), ckpt.checkpoint_dir(run, 2)
    _damage(latest)
    warning = (f"nestlearn: warning: checkpoint {latest}: refused, checksum mismatch in "
               f"model.safetensors (truncated or damaged); using the previous good checkpoint "
               f"{previous}")
    result = subprocess.run([sys.executable, "-m", "nestlearn", "eval", str(run),
                             "--max-batches", "1"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [warning]
    assert result.stdout.startswith(f"{run} step 2 | validation: loss")
    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [warning]
    assert captured.out.startswith("The")
    # with every checkpoint damaged there is nothing to fall back to
    _damage(previous)
    assert main(["eval", str(run)]) == 2
    assert _one_line(capsys) == (
        f"nestlearn eval: error: checkpoint {latest}: refused, checksum mismatch in "
        f"model.safetensors (truncated or damaged); no earlier checkpoint of {str(run)!r} "
        "verifies either (2 damaged)")


def test_the_recipe_demo_help_suggests_works_after_the_default_demo(corpus, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "300")  # one line per option: the recipe name is not wrapped
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    suggested = capsys.readouterr().out.split("try ", 1)[1].split(",")[0].split()[0]
    assert suggested == "tiny-hope"
    common = ["--steps", "2", "--no-progress", "--max-new-tokens", "4",
              *tiny_sets(f"data.corpus={corpus}", "train.steps=2", "data.seq_len=16")]
    assert main(["demo", "--quick", *common]) == 0  # the single-model demo (fewer steps)
    assert main(["demo", "--quick", "--recipe", suggested, *common]) == 0
    out = capsys.readouterr().out
    assert f"[1/3] training {suggested} for 2 steps" in out and "[3/3] sampling" in out
    assert ckpt.latest_checkpoint(tmp_path / "runs" / "demo") is not None
    assert ckpt.latest_checkpoint(tmp_path / "runs" / f"demo-{suggested}") is not None
