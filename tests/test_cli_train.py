import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nestlearn.cli import main
from nestlearn.training.metrics_log import read_records
from trainkit import tiny_sets, write_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def nestlearn(*args, check=True, **kwargs):
    result = subprocess.run([sys.executable, "-m", "nestlearn", *args], capture_output=True,
                            text=True, env=ENV, timeout=300, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "x"
    result = nestlearn("train", "--recipe", "tiny-transformer", "--out", str(out),
                       "--no-progress", *tiny_sets(f"data.corpus={corpus}", "train.steps=6"))
    assert "trained 6 steps" in result.stdout and "bpb" in result.stdout
    return out


def test_train_writes_a_complete_run(trained_run):
    assert (trained_run / "config.json").exists()
    assert (trained_run / "loss_curve.png").exists()
    assert (trained_run / "checkpoints" / "step_00000006" / "checkpoint.json").exists()
    assert [r["step"] for r in read_records(trained_run) if r["split"] == "train"] == [
        1, 2, 3, 4, 5, 6]


def test_eval_prints_loss_perplexity_and_bits_per_byte(trained_run):
    result = nestlearn("eval", str(trained_run), "--json")
    report = json.loads(result.stdout)
    assert report["step"] == 6 and report["split"] == "validation"
    assert report["loss"] > 0 and report["ppl"] > 1 and report["bpb"] > 0
    assert report["tokens"] > 100
    assert (trained_run / "eval_validation.json").exists()


def test_generate_continues_the_prompt(trained_run):
    result = nestlearn("generate", str(trained_run), "--prompt", "The king",
                       "--max-new-tokens", "20", "--temperature", "0")
    assert result.stdout.startswith("The king")
    assert len(result.stdout.rstrip("\n")) > len("The king")


@pytest.mark.slow
def test_resume_continues_with_more_steps(trained_run):
    result = nestlearn("train", "--out", str(trained_run), "--resume", "--no-progress",
                       "--set", "train.steps=8")
    assert "trained 8 steps" in result.stdout
    steps = [r["step"] for r in read_records(trained_run) if r["split"] == "train"]
    assert steps == list(range(1, 9))


def test_list_recipes_and_help(capsys):
    assert main(["train", "--list-recipes"]) == 0
    listed = capsys.readouterr().out
    for name in ("tiny-transformer", "tiny-hope", "tiny-hope-attention", "tiny-titans",
                 "small-hope", "base-transformer"):
        assert name in listed
    for command, options in (
        ("train", ("--recipe", "--set", "--out", "--resume", "--list-recipes", "optim.*")),
        ("eval", ("RUN_DIR", "--split", "--max-batches")),
        ("generate", ("--prompt", "--max-new-tokens", "--temperature", "--max-context")),
        ("demo", ("--recipe", "--steps", "--out")),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helptext = capsys.readouterr().out
        assert all(option in helptext for option in options), command


def test_show_config_applies_overrides(capsys):
    assert main(["train", "--recipe", "tiny-hope", "--set", "model.dim=64",
                 "--set", "optim.betas=0.8,0.9", "--out", "runs/elsewhere",
                 "--show-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["model"]["arch"] == "hope" and config["model"]["dim"] == 64
    assert config["optim"]["betas"] == [0.8, 0.9]
    assert config["train"]["out_dir"] == "runs/elsewhere"


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--recipe", "huge-thing"], "--recipe: got 'huge-thing'; allowed: tiny-"),
    (["train", "--set", "model.width=3"], "unknown field 'model.width'"),
    (["train", "--set", "train.steps=many"], "train.steps: got 'many'; allowed: an integer"),
    (["train", "--set", "data.corpus=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["eval", "/no/such/run"], "run folder '/no/such/run' does not exist"),
    (["generate", "/no/such/run", "--device", "tpu"], "device: got 'tpu'; allowed: auto, cpu"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected, tmp_path, capsys):
    full = [*args, "--out", str(tmp_path / "run")] if args[0] == "train" else args
    assert main(full) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nestlearn {args[0]}: error: ")
    assert expected in lines[0]


def test_bad_input_exits_2_from_a_real_process(tmp_path):
    result = nestlearn("train", "--set", "train.steps=0", "--out", str(tmp_path / "run"),
                       check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "nestlearn train: error: --set train.steps=0: train.steps: got 0; "
        "allowed: an int >= 1"
    )


def test_unwritable_output_folder_is_refused(corpus, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", "--out", str(blocker / "run"),
                 *tiny_sets(f"data.corpus={corpus}")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train.out_dir: cannot write to" in lines[0]


def test_prompt_longer_than_the_context_is_refused(trained_run, capsys):
    assert main(["generate", str(trained_run), "--prompt", "x" * 40]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--prompt: 40 tokens; allowed: at most 32" in lines[0]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes(corpus, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "nestlearn", "train", "--out", str(out), "--no-progress",
         *tiny_sets(f"data.corpus={corpus}", "train.steps=100000")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_records(out)) < 3:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "continue with: nestlearn train --out" in stderr
    stopped = max(r["step"] for r in read_records(out))
    assert (out / "checkpoints" / f"step_{stopped:08d}").exists()
    result = nestlearn("train", "--out", str(out), "--resume", "--no-progress",
                       "--set", f"train.steps={stopped + 2}")
    assert f"trained {stopped + 2} steps" in result.stdout


def test_demo_trains_evaluates_samples_and_reruns(corpus, tmp_path, capsys):
    args = ["demo", "--quick", "--steps", "3", "--out", str(tmp_path / "demo"), "--no-progress",
            "--max-new-tokens", "10", "--prompt", "The",
            *tiny_sets(f"data.corpus={corpus}", "train.steps=3")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/3] training tiny-transformer for 3 steps" in out
    assert "validation: loss" in out and "bpb" in out
    assert "[3/3] sampling 10 tokens" in out
    assert main(args) == 0  # a second run reuses the finished run
    assert "continuing the previous demo run" in capsys.readouterr().out


def test_default_demo_runs_the_continual_stream_and_writes_the_report(tmp_path, capsys,
                                                                       monkeypatch):
    from nestlearn.cli import demo

    # the demo's own stream and rows, made small (the full demo takes minutes)
    monkeypatch.setattr(demo, "DEMO_SIZE", {"tasks": 2, "train_tokens": 3000,
                                            "eval_tokens": 256, "seq_len": 32})
    monkeypatch.setattr(demo, "DEMO_ROWS", (("finetune", "transformer"), ("nested", "hope")))
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 models learn 2 domains in turn (Shakespeare, Mathematics)" in printed
    assert "finetune / transformer" in printed and "nested / hope" in printed
    assert f"report: {out}/report.md" in printed
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["arch"]) for r in results["rows"]] == [
        ("finetune", "transformer"), ("nested", "hope")]
    assert (out / "heatmaps.png").exists()
