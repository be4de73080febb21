"""Argument checks shared by every op: a bad call fails here with a message, not deep in torch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nestlearn.debug import debug_checks_enabled
from nestlearn.errors import NonFiniteError, check_int, invalid


def check_chunk_size(chunk_size: int) -> int:
    return check_int("chunk_size", chunk_size)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Check q, k, v are ``[B, T, H, D]`` with matching B, T, H, dtype and device.

    Returns ``(B, T, H, Dk, Dv)``.
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise invalid(name, type(tensor).__name__, "a torch.Tensor of shape [B, T, H, D]")
        if tensor.dim() != 4:
            raise invalid(f"{name}.shape", tuple(tensor.shape), "4 dims [B, T, H, D]")
        if not tensor.is_floating_point():
            raise invalid(f"{name}.dtype", tensor.dtype, "a floating dtype")
    if q.shape != k.shape:
        raise invalid("k.shape", tuple(k.shape), f"the shape of q {tuple(q.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise invalid("v.shape", tuple(v.shape), f"[B, T, H] = {tuple(q.shape[:3])} as in q, any D")
    check_same_kind(q, {"k": k, "v": v})
    if q.shape[1] == 0:
        raise invalid("q.shape", tuple(q.shape), "a sequence length T >= 1")
    batch, length, heads, dk = q.shape
    return batch, length, heads, dk, v.shape[-1]


def check_same_kind(reference: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    """Every tensor in ``others`` has the dtype and device of ``reference`` (q)."""
    for name, tensor in others.items():
        if tensor.dtype != reference.dtype:
            raise invalid(f"{name}.dtype", tensor.dtype, f"the dtype of q ({reference.dtype})")
        if tensor.device != reference.device:
            raise invalid(f"{name}.device", tensor.device, f"the device of q ({reference.device})")


def check_gate(name: str, gate: torch.Tensor, q: torch.Tensor, low: float | None,
               high: float | None, check_values: bool = True) -> None:
    """A gate is ``[B, T, H]`` like q's first three dims, with q's dtype and device; its
    values are checked too (:func:`check_gate_values`) if ``check_values`` or
    ``nestlearn.debug_checks`` is on."""
    if not isinstance(gate, torch.Tensor):
        raise invalid(name, type(gate).__name__, f"a torch.Tensor of shape {tuple(q.shape[:3])}")
    if tuple(gate.shape) != tuple(q.shape[:3]):
        raise invalid(f"{name}.shape", tuple(gate.shape), f"[B, T, H] = {tuple(q.shape[:3])}")
    check_same_kind(q, {name: gate})
    if check_values or debug_checks_enabled():
        check_gate_values(name, gate, low, high)


def check_gate_values(name: str, gate: torch.Tensor, low: float | None,
                      high: float | None) -> None:
    """The gate's values are finite (else ``NonFiniteError``) and in ``[low, high]`` (else
    ``NestlearnError``). Reads them on the host: one device sync, so ops run it once per
    public call, and layers only under ``nestlearn.debug_checks``."""
    values = gate.detach()
    lo, hi = torch.stack(torch.aminmax(values)).tolist() if values.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise NonFiniteError(f"{name}: got non-finite values; allowed: finite values")
    if (low is not None and lo < low) or (high is not None and hi > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise invalid(name, f"values in [{lo:.4g}, {hi:.4g}]", f"values in {bounds}")


def check_state(name: str, state: torch.Tensor, shape: Sequence[int], q: torch.Tensor) -> None:
    """A state tensor has exactly ``shape`` and q's dtype and device."""
    if not isinstance(state, torch.Tensor):
        raise invalid(name, type(state).__name__, f"a torch.Tensor of shape {tuple(shape)}")
    if tuple(state.shape) != tuple(shape):
        raise invalid(f"{name}.shape", tuple(state.shape), f"{tuple(shape)}")
    check_same_kind(q, {name: state})


def check_rule_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      gates: dict[str, tuple[torch.Tensor, float | None, float | None]],
                      chunk_size: int, check_values: bool = True
                      ) -> tuple[int, int, int, int, int]:
    """Check q, k, v, each gate ``name -> (tensor, low, high)`` (values too if
    ``check_values``, see :func:`check_gate`) and the chunk size.

    Returns ``(B, T, H, Dk, Dv)`` as :func:`check_qkv` does.
    """
    sizes = check_qkv(q, k, v)
    for name, (gate, low, high) in gates.items():
        check_gate(name, gate, q, low, high, check_values)
    check_chunk_size(chunk_size)
    return sizes


def check_matrix_state(name: str, state: torch.Tensor, batch: int, heads: int, rows: int,
                       cols: int, q: torch.Tensor) -> torch.Tensor:
    """A linear memory ``[B, H, rows, cols]``, or ``[H, rows, cols]`` shared by the batch.

    Returns it as ``[B, H, rows, cols]`` (a broadcast view: gradients of a shared state sum
    over the batch, which is how a layer's meta-learned initial memory is trained).
    """
    full = (batch, heads, rows, cols)
    if not isinstance(state, torch.Tensor):
        raise invalid(name, type(state).__name__, f"a torch.Tensor of shape {full}")
    if tuple(state.shape) not in (full, full[1:]):
        raise invalid(f"{name}.shape", tuple(state.shape), f"{full} or {full[1:]}")
    check_same_kind(q, {name: state})
    return state if state.dim() == 4 else state.expand(full)


def check_gated_matrix_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            alpha: torch.Tensor, eta: torch.Tensor,
                            initial_state: torch.Tensor | None,
                            chunk_size: int, check_values: bool = True
                            ) -> tuple[int, torch.Tensor]:
    """Checks shared by the rules with gates (alpha, eta) and one matrix state.

    Returns ``(T, initial memory)``; zeros ``[B, H, Dv, Dk]`` when ``initial_state`` is None.
    """
    batch, length, heads, dk, dv = check_rule_inputs(
        q, k, v, {"alpha": (alpha, 0.0, 1.0), "eta": (eta, 0.0, None)}, chunk_size, check_values
    )
    shape = (batch, heads, dv, dk)
    if initial_state is None:
        return length, q.new_zeros(shape)
    return length, check_matrix_state("initial_state", initial_state, *shape, q)
