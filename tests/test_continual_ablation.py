"""Ablation variants, their tables, and the online forecasting metrics."""

from __future__ import annotations

import math

import pytest

from nestlearn.continual.ablation import (
    VARIANTS,
    ablation_table,
    apply_variant,
    resolve_variants,
    task_entry,
)
from nestlearn.continual.online import segment_metrics, shift_metrics
from nestlearn.continual.runner import model_config
from nestlearn.errors import NestlearnError


def names(arch: str, wanted: list[str]) -> list[str]:
    return [v.name for v in resolve_variants(wanted, model_config(arch, 32))]


def test_paper_group_keeps_what_fits_each_arch_and_drops_repeats_of_the_base():
    hope = names("hope", ["paper"])
    assert hope[0] == "base" and {"no-dgd", "no-cms", "no-inner-k", "inner-q",
                                  "cms-levels-4"} <= set(hope)
    assert "cms-levels-2" not in names("hope", ["all"])  # hope's default CMS has 2 levels
    assert names("hope-attention", ["paper"]) == ["base", "no-cms", "cms-levels-1",
                                                  "cms-levels-3", "cms-levels-4"]
    assert names("titans", ["paper"]) == ["base", "no-momentum", "no-weight-decay"]
    assert names("transformer", ["paper"]) == ["base"]


def test_variants_change_the_field_they_name():
    config = model_config("hope", 32)
    assert apply_variant(config, VARIANTS["cms-levels-4"]).cms.chunk_sizes == (16, 64, 256,
                                                                               1024)
    assert apply_variant(config, VARIANTS["cms-levels-1"]).cms.num_levels == 1
    assert apply_variant(config, VARIANTS["no-cms"]).cms.frozen
    assert not apply_variant(config, VARIANTS["no-dgd"]).memory.dgd
    assert apply_variant(config, VARIANTS["inner-q"]).memory.adaptive_q
    with pytest.raises(NestlearnError, match="allowed: paper, all"):
        resolve_variants(["no-such"], config)
    with pytest.raises(NestlearnError, match="does not fit arch 'titans'"):
        resolve_variants(["no-cms"], model_config("titans", 32))


def test_table_gives_mean_spread_and_change_from_base():
    entries = [{"variant": "base", "description": "d", "values": [0.5, 0.7]},
               {"variant": "no-dgd", "description": "e", "values": [0.4, 0.4]},
               {"variant": "no-cms", "description": "f", "values": [0.6, 0.6]}]
    table = ablation_table(entries, "acc", True)
    assert "| base | d | 0.6000 ± 0.1414 | - | 2 |" in table
    assert "| no-dgd | e | 0.4000 ± 0.0000 | -0.2000 (worse) | 2 |" in table
    lower = ablation_table(entries, "loss", False)
    assert "-0.2000 (better)" in lower


def test_task_entry_averages_the_first_table_per_seed():
    results = {"tables": [{"title": "acc by N", "metric": "accuracy", "rows": [
        {"archs": {"hope": {"seeds": [0, 1], "values": [0.2, 0.4]}}},
        {"archs": {"hope": {"seeds": [0, 1], "values": [0.6, 1.0]}}}]}]}
    entry = task_entry(results, "hope", VARIANTS["no-dgd"])
    assert entry["seeds"] == [0, 1] and entry["values"] == pytest.approx([0.4, 0.7])


def test_segment_metrics_by_hand():
    errors = [4.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    got = segment_metrics(errors, window=2)
    assert got["error_after_shift"] == 4.0 and got["settled_error"] == 1.0
    # 90 % of the gap closed: rolling mean <= 4 - 0.9 * 3 = 1.3, first at window ending step 6
    assert got["steps_to_readapt"] == 6
    flat = segment_metrics([1.0, 1.0, 1.0, 1.0], window=2)
    assert flat["steps_to_readapt"] == 2


def test_shift_metrics_compare_a_recurrence_with_its_first_time():
    first = [4.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]  # re-adapts at step 6
    again = [2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # starts nearer its settled error
    got = shift_metrics([[1.0] * 8, first, again], [None, None, 1], window=2)
    third = got["tasks"][2]
    assert third["steps_to_readapt"] == 3  # mean of steps 2-3 is 1.0 <= 1.5 - 0.9 * 0.5
    assert third["readapt_speedup"] == pytest.approx(6 / 3)
    assert third["shift_error_ratio"] == pytest.approx(1.5 / 4.0)
    assert got["summary"]["recurrence_speedup"] == pytest.approx(2.0)
    assert got["summary"]["shift_error"] == pytest.approx((4.0 + 1.5) / 2)
    none = shift_metrics([[1.0, 2.0]], [None], window=1)
    assert math.isnan(none["summary"]["recurrence_speedup"])
    with pytest.raises(NestlearnError, match="an earlier task"):
        shift_metrics([[1.0], [1.0]], [None, 1], window=1)
