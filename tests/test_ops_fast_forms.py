"""The fewer-op forms inside the chunkwise ops against their direct definitions, in float64:
segment products (tril + constant upper ones). The deep memory's gate coefficients have their
own tests (``test_ops_chunk_coefficients.py``)."""

from __future__ import annotations

import torch

from nestlearn.ops import _chunking
from nestlearn.ops._chunking import segment_products


def segment_products_by_definition(gate: torch.Tensor) -> torch.Tensor:
    """P[p, s] = prod_{s <= j < p} gate[j] for s <= p, 0 above the diagonal, entry by entry."""
    size = gate.shape[-1] + 1
    rows = []
    for p in range(size):
        row = []
        for s in range(size):
            if s > p:
                row.append(torch.zeros_like(gate[..., 0]))
            else:
                row.append(torch.prod(gate[..., s:p], dim=-1))
        rows.append(torch.stack(row, dim=-1))
    return torch.stack(rows, dim=-2)


def test_segment_products_match_their_definition_with_gradients():
    torch.manual_seed(0)
    gate = torch.rand(2, 3, 5, dtype=torch.float64)
    gate[0, 1, 2] = 0.0  # an exact zero keeps finite, exact gradients
    gate[1, 0, 4] = 1.0
    gate.requires_grad_()
    fast, slow = segment_products(gate), segment_products_by_definition(gate)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-15)
    weights = torch.randn_like(fast)
    (fast_grad,) = torch.autograd.grad((fast * weights).sum(), gate)
    (slow_grad,) = torch.autograd.grad((slow * weights).sum(), gate)
    assert torch.isfinite(fast_grad).all()
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-12, atol=1e-14)


def test_segment_products_backward_passes_gradcheck_twice_with_zero_gates():
    torch.manual_seed(1)
    gate = torch.rand(2, 6, dtype=torch.float64)
    gate[0, 0], gate[1, 3], gate[1, 5] = 0.0, 0.0, 1.0
    gate.requires_grad_()
    assert torch.autograd.gradcheck(segment_products, (gate,))
    assert torch.autograd.gradgradcheck(segment_products, (gate,))


def host_reads_in_backward(products_of) -> int:
    """aten host reads (``item`` and friends) seen by the profiler in a backward."""
    gate = torch.rand(3, 8, dtype=torch.float64, requires_grad=True)
    out = products_of(gate)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out.sum().backward()
    return sum(event.name in ("aten::item", "aten::_local_scalar_dense")
               for event in prof.events())


def test_segment_products_backward_reads_nothing_on_the_host():
    # torch's own cumprod backward checks for zeros with .item() (a GPU sync per call)
    assert host_reads_in_backward(_chunking._products_forward) > 0
    assert host_reads_in_backward(segment_products) == 0

