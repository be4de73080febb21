import json

import pytest

from nestlearn.cli import main


def test_bench_layers_runs_at_a_tiny_size(tmp_path, capsys):
    code = main(["bench", "layers", "--sections", "layers", "models", "decode",
                 "--lengths", "16", "--dim", "16", "--heads", "2",
                 "--chunk-size", "4", "--cms-chunk-sizes", "4", "8", "--model-dim", "16",
                 "--model-layers", "1", "--window", "4", "--decode-contexts", "8", "16",
                 "--decode-steps", "2", "--repeats", "1", "--threads", "1", "--no-memory",
                 "--out", str(tmp_path)])
    assert code == 0
    layers = json.loads((tmp_path / "layers.json").read_text())["rows"]
    assert {row["layer"] for row in layers} == {
        "attention", "transformer-block", "neural-memory", "self-modifying-titans", "cms",
        "hope-block", "hope-attention-block"}
    assert all(row["tok/s"] > 0 and row["note"] == "" for row in layers)
    models = json.loads((tmp_path / "layers-models.json").read_text())["rows"]
    assert {row["arch"] for row in models} == {
        "transformer", "hope", "hope-attention", "titans", "titans-mag"}
    decode = json.loads((tmp_path / "layers-decode.json").read_text())["rows"]
    grows = {row["arch"]: row["state MB"] for row in decode if row["context"] == 16}
    short = {row["arch"]: row["state MB"] for row in decode if row["context"] == 8}
    assert grows["transformer"] == 2 * short["transformer"]  # the KV cache
    assert grows["titans"] == short["titans"]
    assert "| arch | context | ms/token |" in capsys.readouterr().out


def test_titans_pytorch_side_by_side(tmp_path):
    pytest.importorskip("titans_pytorch", reason="optional bench dependency")
    code = main(["bench", "layers", "--sections", "titans-pytorch", "--chunk-size", "4",
                 "--titans-dim", "16", "--titans-length", "16", "--titans-batch", "1",
                 "--repeats", "1", "--threads", "1", "--no-memory", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "layers-titans-pytorch.json").read_text())["rows"]
    assert [row["implementation"] for row in rows] == ["nestlearn", "titans-pytorch"]
    assert rows[0]["max err vs naive (f64)"] < 1e-12
    assert rows[0]["speedup vs titans-pytorch"] == pytest.approx(
        rows[0]["tok/s"] / rows[1]["tok/s"])
    # each timed in its own process after the same warm-up, both finished without a note
    assert all(row["tok/s"] > 0 and row["note"] == "" and row["warmup"] == 3 for row in rows)


def test_bench_layers_refuses_unknown_names(capsys):
    assert main(["bench", "layers", "--layers", "lstm"]) == 2
    assert "--layers" in capsys.readouterr().err
