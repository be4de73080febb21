"""``regime-shift``: one piecewise-stationary series for online forecasting.

Each task is a segment of ``segment_len`` steps drawn from one regime process; the schedule
(default "ABCAB") makes regimes come back, so a method that kept what it learned about "A"
forecasts the recurrence "A (again)" well from its first step. A task's validation and test
splits are fresh realizations of its regime's process (their own seeds). Values are clipped to
``RANGE`` and quantized into ``num_bins`` equal-width bins; the tokens are the bin indices.
"""

from __future__ import annotations

import numpy as np
import torch

from nestlearn.continual.stream import SeriesSplit, Stream, Task
from nestlearn.continual.streams._common import knob_int
from nestlearn.errors import NestlearnError

NAME = "regime-shift"
RANGE: tuple[float, float] = (-4.0, 4.0)
# The processes (fixed: a regime that recurs is the same process).
REGIMES: dict[str, dict[str, float | str]] = {
    "A": {"process": "ar1", "mean": -1.5, "phi": 0.8, "noise": 0.3},
    "B": {"process": "sine", "mean": 0.5, "amplitude": 1.5, "period": 25.0, "noise": 0.15},
    "C": {"process": "drift", "start": -3.0, "drift": 0.06, "noise": 0.2, "top": 3.0},
    "D": {"process": "ar1", "mean": 1.5, "phi": 0.3, "noise": 0.6},
}
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def simulate(regime: str, length: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` steps of the process of ``regime``, clipped to ``RANGE``."""
    p = REGIMES[regime]
    noise = rng.normal(0.0, float(p["noise"]), size=length)
    out = np.empty(length)
    if p["process"] == "ar1":
        mean, phi = float(p["mean"]), float(p["phi"])
        # start from the stationary distribution
        x = mean + rng.normal(0.0, float(p["noise"]) / np.sqrt(1.0 - phi * phi))
        for t in range(length):
            x = mean + phi * (x - mean) + noise[t]
            out[t] = x
    elif p["process"] == "sine":
        phase = rng.uniform(0.0, 2.0 * np.pi)
        steps = np.arange(length)
        out = (float(p["mean"]) + float(p["amplitude"])
               * np.sin(2.0 * np.pi * steps / float(p["period"]) + phase) + noise)
    else:
        # a random walk with drift that starts over at "start" once it passes "top"
        start, top = float(p["start"]), float(p["top"])
        x = rng.uniform(start, top)
        for t in range(length):
            x = x + float(p["drift"]) + noise[t]
            if x > top:
                x = start
            out[t] = x
    return np.clip(out, *RANGE)


def _split(values: np.ndarray, regime_id: int, edges: torch.Tensor) -> SeriesSplit:
    tokens = torch.bucketize(torch.from_numpy(values), edges, right=True)
    return SeriesSplit(values=torch.from_numpy(values).float(), tokens=tokens,
                       regimes=torch.full((len(values),), regime_id, dtype=torch.long))


def build(*, seed: int = 0, schedule: str = "ABCAB", segment_len: int = 2000,
          eval_len: int = 512, num_bins: int = 64, seq_len: int = 64) -> Stream:
    """One task per letter of ``schedule`` (letters of ``REGIMES``)."""
    segment_len = knob_int(NAME, "segment_len", segment_len, 2)
    eval_len = knob_int(NAME, "eval_len", eval_len, 2)
    num_bins = knob_int(NAME, "num_bins", num_bins, 2)
    seq_len = knob_int(NAME, "seq_len", seq_len)
    if not isinstance(schedule, str) or not schedule or any(r not in REGIMES for r in schedule):
        raise NestlearnError(f"stream {NAME!r}: schedule: got {schedule!r}; allowed: a "
                             f"non-empty string of the letters {''.join(REGIMES)}")
    letters = sorted(set(schedule))
    low, high = RANGE
    edges_np = np.linspace(low, high, num_bins + 1)[1:-1]
    edges = torch.from_numpy(edges_np)
    centers = ((np.linspace(low, high, num_bins + 1)[:-1]
                + np.linspace(low, high, num_bins + 1)[1:]) / 2.0)
    tasks = []
    seen: dict[str, int] = {}
    names: list[str] = []
    recurs: list[int | None] = []
    for index, regime in enumerate(schedule):
        count = schedule[:index].count(regime)
        name = regime if count == 0 else (f"{regime} (again)" if count == 1
                                          else f"{regime} (again {count})")
        recurs.append(seen.get(regime))
        seen.setdefault(regime, index)
        names.append(name)
        splits = {}
        for split, split_seed in _SPLIT_SEEDS.items():
            rng = np.random.default_rng([seed, index, split_seed])
            length = segment_len if split == "train" else eval_len
            splits[split] = _split(simulate(regime, length, rng), letters.index(regime), edges)
        tasks.append(Task(name=name, **splits))
    return Stream(
        name=NAME, kind="forecast", tasks=tuple(tasks), vocab_size=num_bins, seq_len=seq_len,
        bins=tuple(float(e) for e in edges_np),
        description=f"piecewise-stationary series, regimes {schedule}",
        meta={"seed": seed, "schedule": list(schedule), "regime_ids": letters,
              "regimes": {r: dict(REGIMES[r]) for r in letters},
              "recurrence_of": recurs, "range": list(RANGE),
              "bin_centers": centers.tolist(), "segment_len": segment_len,
              "eval_len": eval_len})
