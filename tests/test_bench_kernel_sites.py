"""``nestlearn bench ops-count --sites``: a step's kernels by the package code that issues
them, adding up to the op budget's count."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from model_cases import TINY_BENCH_MODEL, tiny_config
from nestlearn.benchmarks.kernel_sites import (
    ENGINE,
    OUTSIDE,
    KernelSites,
    count_sites,
    creation_site,
)
from nestlearn.benchmarks.opcount import count_step
from nestlearn.cli import main
from nestlearn.ops._deep_memory_common import mlp_forward

BACKWARD_SITE = re.compile(r"^\w+ <- (nestlearn\.[\w.<>]+|\(outside nestlearn\))$")


@pytest.mark.parametrize("arch", ["transformer", "titans", "hope"])
def test_sites_add_up_to_the_budget_and_are_deterministic(arch):
    config = tiny_config(arch)
    sites = count_sites(config, length=12, batch=2)
    assert sum(sites.values()) == count_step(config, length=12, batch=2)["kernels/step"]
    assert count_sites(config, length=12, batch=2, seed=3) == sites  # other values, same ops
    phases = {phase for phase, _ in sites}
    assert phases == {"forward", "backward"}
    for phase, site in sites:
        if phase == "forward":
            assert site == OUTSIDE or site.startswith("nestlearn."), site
            assert not site.startswith("nestlearn.benchmarks"), site
        else:
            assert site == ENGINE or BACKWARD_SITE.match(site), site


def test_hope_s_written_nodes_are_named_in_both_phases():
    sites = count_sites(tiny_config("hope"), length=12, batch=1)
    assert sites[("forward", "nestlearn.ops._chunk_read._read_forward")] > 0
    assert sites[("backward", "_ChunkReadBackward <- nestlearn.ops._chunk_read.chunk_read")] > 0
    assert sites[("backward", "_KeyPassBackward <- nestlearn.ops._key_pass.key_pass")] > 0


def test_a_kernel_is_charged_to_the_function_that_recorded_its_node():
    weights = (torch.randn(2, 6, 4, requires_grad=True), torch.randn(2, 4, 6, requires_grad=True))
    x = torch.randn(1, 2, 3, 4, requires_grad=True)
    counter = KernelSites()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
        with torch.autograd.detect_anomaly(check_nan=False), counter:
            out = mlp_forward(weights, x, "gelu")
            loss = out.square().sum()  # here, outside the package
            counter.phase = "backward"
            loss.backward()
    sites = counter.sites
    site = "nestlearn.ops._deep_memory_common.mlp_forward"
    assert sites[("forward", site)] >= 4  # two products, the activation, the residual sum
    assert sites[("forward", OUTSIDE)] == 2  # square, sum
    assert sites[("backward", f"GeluBackward0 <- {site}")] == 1
    assert sites[("backward", f"BmmBackward0 <- {site}")] >= 4  # two per product
    assert sites[("backward", f"PowBackward0 <- {OUTSIDE}")] >= 1


def test_cli_lists_the_top_sites_per_arch(tmp_path, capsys):
    code = main(["bench", "ops-count", "--archs", "transformer", "titans", "--length", "16",
                 *TINY_BENCH_MODEL, "--chunk-size", "8", "--sites", "3", "--out",
                 str(tmp_path)])
    assert code == 0
    assert "| arch | phase | site | kernels | share |" in capsys.readouterr().out
    budget = json.loads((tmp_path / "ops-count.json").read_text())["rows"]
    rows = json.loads((tmp_path / "ops-count-sites.json").read_text())["rows"]
    assert [row["arch"] for row in rows] == ["transformer"] * 3 + ["titans"] * 3
    for arch_rows, step in zip((rows[:3], rows[3:]), budget, strict=True):
        kernels = [row["kernels"] for row in arch_rows]
        assert kernels == sorted(kernels, reverse=True) and sum(kernels) <= step["kernels/step"]
        for row in arch_rows:
            assert row["share"] == pytest.approx(row["kernels"] / step["kernels/step"])


def test_cli_refuses_negative_sites(capsys):
    assert main(["bench", "ops-count", "--archs", "titans", "--sites", "-1"]) != 0
    assert "--sites" in capsys.readouterr().err


def test_decode_sites_add_up_to_the_decode_budget(tmp_path, capsys):
    code = main(["bench", "ops-count", "--archs", "titans", "--length", "8", "--model-dim",
                 "16", "--model-layers", "1", "--heads", "2", "--chunk-size", "4",
                 "--vocab-size", "32", "--decode-tokens", "4", "--sites", "1000", "--out",
                 str(tmp_path)])
    assert code == 0
    budget = json.loads((tmp_path / "ops-count.json").read_text())["rows"][0]
    rows = json.loads((tmp_path / "ops-count-sites.json").read_text())["rows"]
    decode = [row for row in rows if row["phase"] == "decode"]
    assert decode and all(row["site"].startswith("nestlearn.") for row in decode)
    assert sum(row["kernels"] for row in decode) == pytest.approx(budget["decode kernels/token"])
    step = [row for row in rows if row["phase"] != "decode"]
    assert sum(row["kernels"] for row in step) == budget["kernels/step"]


class _Recorded:
    """A node as anomaly mode leaves it: its creation stack as formatted frames."""

    def __init__(self, *frames: str) -> None:
        self.metadata = {"traceback_": list(frames)}


def test_a_creation_site_is_the_innermost_package_frame_outside_the_benchmarks():
    frame = '  File "{}", line 3, in {}\n    x = y\n'
    node = _Recorded(frame.format("/x/nestlearn/benchmarks/counted_runs.py", "step"),
                     frame.format("/x/nestlearn/nn/__init__.py", "outer"),
                     frame.format("C:\\env\\nestlearn\\ops\\deep_memory.py", "_chunk"),
                     frame.format("/x/torch/nn/functional.py", "linear"))
    assert creation_site(node) == "nestlearn.ops.deep_memory._chunk"
    assert creation_site(_Recorded(frame.format("/x/nestlearn/nn/__init__.py", "f"))) == (
        "nestlearn.nn.f")
    assert creation_site(_Recorded(frame.format("/x/nestlearn/benchmarks/opcount.py", "f"),
                                   frame.format("/x/torch/autograd.py", "g"))) == OUTSIDE
    assert creation_site(_Recorded()) == OUTSIDE
