import json

import torch

from nestlearn.benchmarks.common import format_table, peak_memory_mb, write_report


def allocate_mib(mib: int):
    def run():
        return torch.ones(mib, 1024, 256).sum()  # 256 float32 * 1024 = 1 MiB per row

    return run


def test_peak_memory_counts_only_the_workload_not_the_parent():
    parent_ballast = torch.ones(200, 1024, 256)  # 200 MiB held by the measuring process
    measured = peak_memory_mb(allocate_mib, mib=64)
    assert 56 < measured < 100, measured
    assert parent_ballast.numel() > 0


def test_write_report_prints_table_and_writes_json(tmp_path, capsys):
    rows = [{"rule": "a", "tokens_per_s": 1234.5678}, {"rule": "b", "tokens_per_s": None}]
    path = write_report("demo", rows, ["rule", "tokens_per_s"], tmp_path)
    out = capsys.readouterr().out
    assert "| a | 1235 |" in out and "| b |  |" in out
    data = json.loads(path.read_text())
    assert data["rows"] == rows and data["environment"]["torch"] == torch.__version__
    assert format_table(rows, ["rule"]).splitlines()[1] == "|---|"
