"""What a run cost: wall time, CPU time, tokens and tokens/s, peak memory and energy.

Use :class:`ResourceMeter` as a context manager (or ``start()`` / ``stop()``), add the tokens the
run processed with :meth:`ResourceMeter.add_tokens`, then read :meth:`ResourceMeter.as_dict`
(the ``resources`` of a results.json row).

Energy comes from codecarbon's ``OfflineEmissionsTracker`` when codecarbon is importable (the
``energy`` extra) and starts cleanly; otherwise it is an estimate, the process CPU time times
:data:`WATTS_PER_CORE` watts per busy core, and ``energy_source`` says which. The estimate
ignores the GPU, memory and idle power: it is a like-for-like comparison of CPU work between
runs on one machine, not a wattmeter reading.

Peak memory is the process's peak resident set size since it started (``getrusage``: it never
goes down, so a meter started late still reports the earlier peak); on CUDA the peak
``torch.cuda.max_memory_allocated`` is added, its counter reset when the meter starts.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import time
from types import TracebackType
from typing import Any

from nestlearn.errors import NestlearnError, check_int, check_positive

WATTS_PER_CORE = 15.0
"""Stated power of one busy CPU core for the energy estimate (a laptop/server core's share of
a TDP of roughly 10-20 W)."""

_log = logging.getLogger(__name__)


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


class ResourceMeter:
    """Measures one run. ``energy``: ``"auto"`` (codecarbon if importable, else the estimate),
    ``"codecarbon"`` (fail if it cannot be used) or ``"estimate"``."""

    def __init__(self, *, energy: str = "auto", watts_per_core: float = WATTS_PER_CORE,
                 country_iso_code: str = "USA") -> None:
        if energy not in ("auto", "codecarbon", "estimate"):
            raise NestlearnError(f"energy: got {energy!r}; allowed: 'auto', 'codecarbon' or "
                                 "'estimate'")
        self.energy = energy
        self.watts_per_core = check_positive("watts_per_core", watts_per_core)
        self.country_iso_code = country_iso_code
        self.tokens = 0
        self._wall0: float | None = None
        self._cpu0 = 0.0
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self._tracker: Any = None
        self._energy_j: float | None = None
        self._source = ""
        self._cuda = False
        self._cuda_peak_mb: float | None = None
        self._running = False

    def _start_tracker(self) -> None:
        if self.energy == "estimate":
            return
        try:
            module = importlib.import_module("codecarbon")
            tracker = module.OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code, save_to_file=False, log_level="error")
            tracker.start()
        except Exception as error:  # codecarbon missing or unable to read this machine
            if self.energy == "codecarbon":
                raise NestlearnError(f"energy: got 'codecarbon' but it cannot be used "
                                     f"({type(error).__name__}: {error}); allowed: 'auto' or "
                                     "'estimate', or install nestlearn[energy]") from None
            _log.debug("codecarbon unavailable, energy is estimated: %s", error)
            return
        self._tracker = tracker

    def start(self) -> ResourceMeter:
        if self._running:
            raise NestlearnError("ResourceMeter.start: got a meter already running; allowed: "
                                 "start after stop, or a new meter")
        self._cuda = _cuda_in_use()
        if self._cuda:
            sys.modules["torch"].cuda.reset_peak_memory_stats()
        self._start_tracker()
        self._running = True
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()
        return self

    def add_tokens(self, count: int) -> None:
        """Count ``count`` more tokens (inputs trained on or evaluated) towards tokens/s."""
        self.tokens += check_int("tokens", count, minimum=0)

    def stop(self) -> ResourceMeter:
        if not self._running or self._wall0 is None:
            raise NestlearnError("ResourceMeter.stop: got a meter that is not running; "
                                 "allowed: stop after start")
        self.wall_s = time.perf_counter() - self._wall0
        self.cpu_s = time.process_time() - self._cpu0
        self._running = False
        if self._cuda:
            torch = sys.modules["torch"]
            self._cuda_peak_mb = torch.cuda.max_memory_allocated() / (1024 * 1024)
        self._energy_j = None
        if self._tracker is not None:
            with contextlib.suppress(Exception):
                self._tracker.stop()
                kwh = float(self._tracker.final_emissions_data.energy_consumed)
                self._energy_j = kwh * 3.6e6
                self._source = "codecarbon"
            self._tracker = None
        if self._energy_j is None:
            self._energy_j = self.cpu_s * self.watts_per_core
            self._source = f"estimate: cpu time x {self.watts_per_core:g} W per core"
        return self

    def __enter__(self) -> ResourceMeter:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._running:
            self.stop()

    def as_dict(self) -> dict[str, Any]:
        """The results.json ``resources``: ``wall_s``, ``cpu_s``, ``tokens``, ``tokens_per_s``,
        ``peak_rss_mb``, ``peak_cuda_mb`` (None off CUDA), ``energy_j``, ``energy_source``."""
        if self._running:
            raise NestlearnError("ResourceMeter.as_dict: got a meter still running; allowed: "
                                 "read it after stop()")
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "peak_cuda_mb": self._cuda_peak_mb,
            "energy_j": self._energy_j,
            "energy_source": self._source,
        }
