"""Memory ops run in full precision under autocast.

An op's state is learned by in-context gradient steps summed over a whole stream; in bf16 its
small steps round away and the chunkwise and per-token forms drift apart. So, under autocast,
an op runs with autocast off and its bf16/fp16 tensors raised to float32: its state keeps
the precision of the (float32) parameters it starts from, and the surrounding layers still
run their projections in bf16.

Without autocast, an op called with bf16/fp16 tensors (a model cast with
``.to(torch.bfloat16)``) also computes in float32 and hands its outputs and state back in the
dtype it was given: the same reason holds, and some kernels it needs (the triangular solve of
the delta rule and of the deep memory on CPU) have no bf16/fp16 form at all. Float32 and
float64 calls, and calls mixing dtypes (refused by the op's own checks), are not cast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from nestlearn.state import first_tensor, tensors, tree_map

F = TypeVar("F", bound=Callable[..., Any])
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _raise_precision(value: Any) -> Any:
    """``value`` (arguments, states inside them) with its bf16/fp16 tensors in float32."""
    return tree_map(lambda t: t.float() if t.dtype in LOW_PRECISION else t, value)


def _autocast_device(args: tuple, kwargs: dict) -> str | None:
    """The device type of the first tensor in the arguments (inside states too) if autocast
    is on for it, else None (also for device types autocast does not know, such as meta)."""
    first = first_tensor((args, kwargs))
    if first is None:
        return None
    device = first.device.type
    try:
        return device if torch.is_autocast_enabled(device) else None
    except RuntimeError:
        return None


def _low_precision_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype of the floating tensors in the arguments if they all share one bf16/fp16
    dtype, else None."""
    first = first_tensor((args, kwargs), floating=True)
    if first is None or first.dtype not in LOW_PRECISION:
        return None
    dtype = first.dtype
    return dtype if all(t.dtype == dtype for t in tensors((args, kwargs))
                        if t.is_floating_point()) else None


def _lower_precision(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (outputs, states) with its float32 tensors back in ``dtype``."""
    return tree_map(lambda t: t.to(dtype) if t.dtype == torch.float32 else t, value)


def full_precision(op: F) -> F:
    """Decorator: under autocast, run ``op`` with autocast off and bf16/fp16 inputs in float32;
    without autocast, run a call made in bf16/fp16 in float32 and return its results in the
    dtype it was given."""

    @functools.wraps(op)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = _autocast_device(args, kwargs)
        if device is not None:
            with torch.autocast(device_type=device, enabled=False):
                return op(*_raise_precision(args), **_raise_precision(kwargs))
        dtype = _low_precision_dtype(args, kwargs)
        if dtype is None:
            return op(*args, **kwargs)
        return _lower_precision(op(*_raise_precision(args), **_raise_precision(kwargs)), dtype)

    return wrapper  # type: ignore[return-value]
