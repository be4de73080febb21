"""ResourceMeter: tokens and rates, the labelled CPU estimate, and codecarbon through a fake."""

from __future__ import annotations

import sys
import types

import pytest

from nestlearn.continual.resources import WATTS_PER_CORE, ResourceMeter
from nestlearn.errors import NestlearnError


def busy() -> int:
    return sum(i * i for i in range(200_000))


def block_codecarbon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # import now raises ImportError


def fake_codecarbon(monkeypatch: pytest.MonkeyPatch, kwh: float, fail_start: bool = False
                    ) -> list[dict]:
    calls: list[dict] = []

    class OfflineEmissionsTracker:
        def __init__(self, **kwargs: object) -> None:
            calls.append(dict(kwargs))
            self.final_emissions_data = None

        def start(self) -> None:
            if fail_start:
                raise RuntimeError("no power counters here")
            calls.append({"started": True})

        def stop(self) -> float:
            calls.append({"stopped": True})
            self.final_emissions_data = types.SimpleNamespace(energy_consumed=kwh)
            return 1e-6

    module = types.ModuleType("codecarbon")
    module.OfflineEmissionsTracker = OfflineEmissionsTracker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "codecarbon", module)
    return calls


def test_tokens_rates_and_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    block_codecarbon(monkeypatch)
    with ResourceMeter() as meter:
        busy()
        meter.add_tokens(1000)
        meter.add_tokens(24)
    out = meter.as_dict()
    assert out["tokens"] == 1024
    assert out["wall_s"] > 0 and out["cpu_s"] >= 0
    assert out["tokens_per_s"] == pytest.approx(1024 / out["wall_s"])
    assert out["peak_rss_mb"] > 1
    assert out["peak_cuda_mb"] is None
    assert out["energy_source"] == "estimate: cpu time x 15 W per core"
    assert out["energy_j"] == pytest.approx(out["cpu_s"] * WATTS_PER_CORE)
    assert set(out) >= {"wall_s", "tokens", "tokens_per_s", "peak_rss_mb", "energy_j",
                        "energy_source"}


def test_estimate_states_its_wattage() -> None:
    meter = ResourceMeter(energy="estimate", watts_per_core=7.5).start()
    busy()
    out = meter.stop().as_dict()
    assert out["energy_source"] == "estimate: cpu time x 7.5 W per core"
    assert out["energy_j"] == pytest.approx(out["cpu_s"] * 7.5)


def test_codecarbon_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_codecarbon(monkeypatch, kwh=2e-6)
    with ResourceMeter() as meter:
        meter.add_tokens(10)
    out = meter.as_dict()
    assert out["energy_source"] == "codecarbon"
    assert out["energy_j"] == pytest.approx(2e-6 * 3.6e6)
    assert calls[0]["save_to_file"] is False and {"started": True} in calls
    assert {"stopped": True} in calls


def test_estimate_asked_for_skips_codecarbon(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_codecarbon(monkeypatch, kwh=2e-6)
    with ResourceMeter(energy="estimate") as meter:
        pass
    assert calls == []
    assert meter.as_dict()["energy_source"].startswith("estimate:")


def test_codecarbon_failing_falls_back_or_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_codecarbon(monkeypatch, kwh=1.0, fail_start=True)
    with ResourceMeter() as meter:
        pass
    assert meter.as_dict()["energy_source"].startswith("estimate:")
    with pytest.raises(NestlearnError, match="no power counters"):
        ResourceMeter(energy="codecarbon").start()
    block_codecarbon(monkeypatch)
    with pytest.raises(NestlearnError, match="energy: got 'codecarbon'"):
        ResourceMeter(energy="codecarbon").start()


def test_misuse() -> None:
    with pytest.raises(NestlearnError, match="energy: got 'watts'"):
        ResourceMeter(energy="watts")
    with pytest.raises(NestlearnError, match="watts_per_core"):
        ResourceMeter(watts_per_core=0)
    meter = ResourceMeter(energy="estimate")
    with pytest.raises(NestlearnError, match="not running"):
        meter.stop()
    meter.start()
    with pytest.raises(NestlearnError, match="already running"):
        meter.start()
    with pytest.raises(NestlearnError, match="still running"):
        meter.as_dict()
    with pytest.raises(NestlearnError, match="tokens"):
        meter.add_tokens(-1)
    meter.stop()
