"""The compiled path: ``torch.compile`` of the memories' steps, with an eager fallback.

Off by default. ``nestlearn.ops.set_compile(True)`` (or ``NESTLEARN_COMPILE=1`` in the
environment, or ``train.compile: true`` in a run config) compiles each step the first time it
runs (the deep memory's chunk and token steps, the self-modifying layer's stacked chunk and
its inner memories' chunk, a CMS level's piece); the compiled step is exact (the float64
parity tests run on it too). A step that cannot be compiled (no C++ compiler for the CPU
backend, an unsupported platform or op) warns once and runs eagerly from then on, in this
process. ``backend`` picks the ``torch.compile`` backend ("inductor", the default, generates
fused kernels; "aot_eager" only traces, which checks a graph quickly).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from nestlearn.errors import NestlearnError, NonFiniteError, check_choice, invalid

ENV_VAR = "NESTLEARN_COMPILE"
# Graphs one step may compile (dynamo's default is 8): a CMS piece is compiled per level, per
# weight rank (shared initial weights, then per-batch ones), per piece length and per grad
# mode (training, evaluation, decoding). Past the limit dynamo logs a warning and runs the
# step eagerly.
RECOMPILE_LIMIT = 64
BACKENDS = ("inductor", "aot_eager", "eager")

_enabled: bool | None = None  # None: the environment variable decides
_backend = "inductor"

F = TypeVar("F", bound=Callable[..., Any])


def set_compile(enabled: bool | None = True, backend: str = "inductor") -> None:
    """Compile the memories' steps from now on (False: eager; None: as the environment says)."""
    global _enabled, _backend
    if enabled is not None and not isinstance(enabled, bool):
        raise invalid("enabled", repr(enabled), "None, true or false")
    check_choice("backend", backend, BACKENDS)
    _enabled, _backend = enabled, backend


def compile_enabled() -> bool:
    """Whether the memories' steps run compiled."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "off")


class _CompiledStep:
    """``fn`` that runs compiled while the switch is on, eagerly after a failure to compile."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.compiled: dict[str, Callable[..., Any]] = {}
        self.failed = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Inside another compiled step the outer graph takes this one in as it is.
        if self.failed or not compile_enabled() or torch.compiler.is_compiling():
            return self.fn(*args, **kwargs)
        try:
            step = self.compiled.get(_backend)
            if step is None:
                step = self.compiled[_backend] = _compile(self.fn, _backend)
            return step(*args, **kwargs)
        except (NestlearnError, NonFiniteError, torch.OutOfMemoryError):
            raise  # the step's own errors, not the compiler's
        except Exception as err:  # any compiler failure: fall back, say so once
            self.failed = True
            warnings.warn(f"torch.compile of {self.fn.__qualname__} failed, running it eagerly "
                          f"from now on ({type(err).__name__}: {str(err).splitlines()[0]})",
                          RuntimeWarning, stacklevel=2)
            return self.fn(*args, **kwargs)


def _compile(fn: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """``torch.compile(fn)`` allowed ``RECOMPILE_LIMIT`` graphs. Where torch.compile takes the
    limit per function (torch 2.13 does, 2.11 does not), it is passed; otherwise dynamo's
    global limit is raised while the step runs (named ``cache_size_limit`` before torch 2.6)."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(fn, backend=backend, recompile_limit=RECOMPILE_LIMIT)
    compiled = torch.compile(fn, backend=backend)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        # a process-wide setting, patched per call: not safe across threads compiling at once
        with config.patch({name: max(getattr(config, name), RECOMPILE_LIMIT)}):
            return compiled(*args, **kwargs)

    return run


def compiled_step(fn: F) -> F:
    """Decorate a step: compiled under ``set_compile(True)``, eager otherwise."""
    return _CompiledStep(fn)  # type: ignore[return-value]
