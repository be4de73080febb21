"""Memory ops run in full precision under autocast.

An op's state is learned by in-context gradient steps summed over a whole stream; in bf16 its
small steps round away and the chunkwise and per-token forms drift apart. So, under autocast,
an op runs with autocast off and its bf16/fp16 tensors raised to float32: its state keeps
the precision of the (float32) parameters it starts from, and the surrounding layers still
run their projections in bf16. Without autocast nothing is cast.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, through tuples, lists, dicts and dataclass states."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


def _raise_precision(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(_raise_precision(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_raise_precision(item) for item in value)
    if isinstance(value, dict):
        return {key: _raise_precision(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # a copy with every field raised, without re-running __init__ / __post_init__ (which
        # would also miss fields declared init=False)
        raised = copy.copy(value)
        for field in dataclasses.fields(value):
            object.__setattr__(raised, field.name, _raise_precision(getattr(value, field.name)))
        return raised
    return value


def _autocast_device(args: tuple, kwargs: dict) -> str | None:
    """The device type of the first tensor in the arguments (inside states too) if autocast
    is on for it, else None (also for device types autocast does not know, such as meta)."""
    for tensor in _tensors((args, kwargs)):
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
