"""Memory ops run in full precision under autocast.

An op's state is learned by in-context gradient steps summed over a whole stream; in bf16 its
small steps round away and the chunkwise and per-token forms drift apart. So, under autocast,
an op runs with autocast off and its bf16/fp16 tensors raised to float32: its state keeps
the precision of the (float32) parameters it starts from, and the surrounding layers still
run their projections in bf16. Without autocast nothing is cast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from nestlearn.state import tensors, tree_map

F = TypeVar("F", bound=Callable[..., Any])
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _raise_precision(value: Any) -> Any:
    """``value`` (arguments, states inside them) with its bf16/fp16 tensors in float32."""
    return tree_map(lambda t: t.float() if t.dtype in LOW_PRECISION else t, value)


def _autocast_device(args: tuple, kwargs: dict) -> str | None:
    """The device type of the first tensor in the arguments (inside states too) if autocast
    is on for it, else None (also for device types autocast does not know, such as meta)."""
    for tensor in tensors((args, kwargs)):
        device = tensor.device.type
        try:
            return device if torch.is_autocast_enabled(device) else None
        except RuntimeError:
            return None
    return None


def full_precision(op: F) -> F:
    """Decorator: under autocast, run ``op`` with autocast off and bf16/fp16 inputs in float32."""

    @functools.wraps(op)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = _autocast_device(args, kwargs)
        if device is None:
            return op(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return op(*_raise_precision(args), **_raise_precision(kwargs))

    return wrapper  # type: ignore[return-value]
