import itertools
import json
import math

from nestlearn.cli import main
from nestlearn.nn.memory_common import derived_eta_max


def test_bench_recall_runs_at_a_tiny_size(tmp_path, capsys):
    code = main(["bench", "recall", "--head-dims", "16", "--associations", "16",
                 "--repetitions", "4", "--chunk-sizes", "4", "16", "--chunk-steps", "1", "64",
                 "--gate-fractions", "1", "0.5", "--worst-chunk-steps", "1", "64",
                 "--worst-keys", "1", "4", "--worst-length", "256", "--threads", "1",
                 "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "recall.json").read_text())["rows"]
    settings = {(row["chunk"], row["gates"], row["chunk_step"]): row for row in rows}
    assert set(settings) == {(c, g, s) for c in (4, 16) for g in (1.0, 0.5) for s in (1.0, 64.0)}
    for (chunk, _, step), row in settings.items():
        # the layer's own ceiling, with NeuralMemoryConfig's expansion and theta_max
        assert row["eta_max"] == derived_eta_max(step, chunk, 4, 0.9)
        assert row["activation"] == "gelu"
        assert len(row["errors"]) == 5
        assert 1.8 < row["errors"][0] < 2.3  # unit k and v, nothing stored yet
    for chunk in (4, 16):
        for fraction in (1.0, 0.5):
            stable = settings[(chunk, fraction, 1.0)]
            assert stable["status"] == "ok" and stable["finite"]
            errors = stable["errors"]
            assert all(math.isfinite(e) for e in errors)
            assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    # at the caps a step 64 times the bound diverges; at half the gates it learns fastest
    assert settings[(4, 1.0, 64.0)]["status"] == "non-finite"
    assert not settings[(4, 1.0, 64.0)]["finite"]
    assert settings[(4, 0.5, 64.0)]["errors"][-1] < 0.5 * settings[(4, 0.5, 1.0)]["errors"][-1]

    worst = json.loads((tmp_path / "recall-worst.json").read_text())["rows"]
    assert {(row["chunk"], row["keys"], row["chunk_step"]) for row in worst} == {
        (c, k, s) for c in (4, 16) for k in (1, 4) for s in (1.0, 64.0)}
    for row in worst:
        if row["chunk_step"] == 1.0:
            assert row["status"] == "ok" and row["final error"] < 0.5
        else:
            assert row["status"] != "ok"
    assert any(row["non-finite after"] == 256 for row in worst)
    out = capsys.readouterr().out
    assert "| D | N | chunk | gates | step 1 | step 64 |" in out
    assert "(non-finite)" in (tmp_path / "recall.md").read_text()


def test_bench_recall_refuses_pairs_that_end_inside_a_chunk(capsys):
    assert main(["bench", "recall", "--associations", "24", "--chunk-sizes", "16"]) == 2
    assert "--associations" in capsys.readouterr().err


def test_bench_recall_refuses_an_unknown_activation(capsys):
    assert main(["bench", "recall", "--activation", "sigmoid"]) == 2
    assert "--activation" in capsys.readouterr().err


def test_bench_recall_measures_the_memory_layers_the_models_build(tmp_path, capsys):
    code = main(["bench", "recall", "--layers-only", "--layer-archs", "titans", "hope",
                 "--layer-dim", "16", "--layer-heads", "2", "--associations", "32",
                 "--repetitions", "3", "--layer-memory", "chunk_size=8", "eta_init=0.8",
                 "--no-plot", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "recall-layers.json").read_text())["rows"]
    assert [row["arch"] for row in rows] == ["titans", "hope"]
    for row in rows:
        assert row["chunk_size"] == 8 and row["memory"] == "chunk_size=8 eta_init=0.8"
        assert row["eta ceiling"] == derived_eta_max(1.0, 8, 4, 0.9)
        assert len(row["errors"]) == 4 and row["finite"]
        assert row["errors"][-1] < row["errors"][0]  # the memory stores the repeated pairs
        assert 0.6 < row["eta / ceiling"] < 1.0  # the initial gates the layer chose
    assert rows[1]["inner growth"] is not None
    assert not (tmp_path / "recall.json").exists()  # --layers-only skips the op tables


def test_bench_recall_refuses_a_malformed_layer_field(capsys):
    assert main(["bench", "recall", "--layers-only", "--layer-archs", "titans",
                 "--layer-memory", "chunk_size"]) == 2
    assert "--layer-memory" in capsys.readouterr().err
