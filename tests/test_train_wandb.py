"""The Weights & Biases sink: real offline runs read back from the files wandb writes."""

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from nestlearn.errors import NestlearnError
from nestlearn.training import checkpoint as ckpt
from nestlearn.training import train
from nestlearn.training.metrics_log import read_records
from nestlearn.training.runconfig import apply_overrides
from nestlearn.training.wandb_sink import STATE_NAME, WandbSink
from trainkit import tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                        ("WANDB_DIR", tmp_path / "wandb-dir"),
                        ("WANDB_CACHE_DIR", tmp_path / "wandb-cache"),
                        ("WANDB_CONFIG_DIR", tmp_path / "wandb-config")):
        monkeypatch.setenv(name, str(value))


def wandb_records(path: Path) -> list:
    """The records of a ``run-ID.wandb`` file: a W&B header (7 bytes), then the LevelDB log
    format (32 KiB blocks of chunks: crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4)
    whose records are ``wandb_internal_pb2.Record`` messages."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, parts, records = 32768, 7, [], []
    while pos + 7 <= len(raw):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if room < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += room
            continue
        parts.append(raw[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def offline_runs(run_dir: Path) -> list[tuple[str, str, list[dict], dict]]:
    """(run id, run name, history rows, config) of each offline W&B run in ``run_dir``, oldest
    first."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        records = wandb_records(next(folder.glob("run-*.wandb")))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        out.append((run.run_id, run.display_name, history, config))
    return out


def test_offline_run_logs_the_rows_of_metrics_jsonl(corpus, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(corpus, run_dir, "train.steps=4", "train.wandb_project=nl-test",
                         "train.wandb_mode=offline")
    train(config, progress=False)
    (run_id, name, history, wandb_config), = offline_runs(run_dir)
    assert name == "run"
    assert json.loads((run_dir / STATE_NAME).read_text()) == {"id": run_id, "step": 4}
    records = read_records(run_dir)
    train_rows = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    logged = {row["_step"]: row for row in history}
    for r in train_rows:
        assert logged[r["step"]]["train/loss"] == r["loss"]
        assert logged[r["step"]]["train/lr"] == r["lr"]
    final_eval, = (r for r in records if r["split"] == "eval")
    assert logged[4]["eval/loss"] == final_eval["loss"]
    assert logged[4]["eval/bpb"] == final_eval["bpb"]
    saved = json.loads((run_dir / "config.json").read_text())
    assert {key: wandb_config[key] for key in saved} == saved  # the resolved run config


def test_resume_continues_the_same_run_without_logging_a_row_twice(corpus, tmp_path):
    run_dir = tmp_path / "run"
    # a constant schedule: the steps before the interruption do not depend on train.steps
    sets = ("train.wandb_project=nl-test", "train.checkpoint_every=4", "train.keep_checkpoints=3",
            "schedule.kind=constant")
    train(tiny_config(corpus, run_dir, "train.steps=6", *sets), progress=False)
    # an interruption after step 6 whose last checkpoint is step 4
    shutil.rmtree(ckpt.latest_checkpoint(run_dir))
    assert ckpt.latest_checkpoint(run_dir).name.endswith("4")
    result = train(tiny_config(corpus, run_dir, "train.steps=8", *sets), resume=True,
                   progress=False)
    assert result.step == 8
    (first_id, _, first, _), (second_id, _, second, _) = offline_runs(run_dir)
    assert first_id == second_id
    assert [row["_step"] for row in first] == [1, 2, 3, 4, 5, 6]
    assert [row["_step"] for row in second] == [7, 8]  # steps 5 and 6 are not logged again
    records = read_records(run_dir)  # the resumed run's rows equal the first run's
    losses = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    for row in first + second:
        assert row["train/loss"] == losses[row["_step"]]
    assert json.loads((run_dir / STATE_NAME).read_text()) == {"id": first_id, "step": 8}


def test_missing_wandb_is_one_clear_error_before_training(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    config = tiny_config(corpus, tmp_path / "run", "train.wandb_project=nl-test")
    with pytest.raises(NestlearnError, match=r"nestlearn\[wandb\]"):
        train(config, progress=False)
    assert read_records(tmp_path / "run") == []
    assert ckpt.latest_checkpoint(tmp_path / "run") is None


def test_config_fields_are_checked(corpus, tmp_path):
    with pytest.raises(NestlearnError, match=r"train\.wandb_mode"):
        tiny_config(corpus, tmp_path / "run", "train.wandb_mode=cloud")
    with pytest.raises(NestlearnError, match=r"train\.wandb_project"):
        apply_overrides(tiny_config(corpus, tmp_path / "run"), ["train.wandb_project= "])


def test_disabled_mode_logs_and_records_nothing(tmp_path):
    sink = WandbSink(tmp_path / "run", "nl-test", "disabled", {"name": "x"})
    sink.start(resume=False)
    sink.log({"step": 1, "split": "train", "loss": 1.0})
    sink.close()
    assert not (tmp_path / "run" / STATE_NAME).exists()
    assert not list((tmp_path / "run").glob("wandb/*run-*"))
