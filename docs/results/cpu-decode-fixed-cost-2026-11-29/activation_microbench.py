"""Per-call times (us) of the memory activations' slopes and of exact GELU, 2 threads.

The slopes: the closed forms of the tree before (dcfe130), the backward kernel given a
broadcast scalar of ones (the first version, replaced) and given ones written out (kept).
Exact GELU and its backward with PyTorch's oneDNN path on (the default) and off."""

import math
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
SHAPES = ((1, 4, 1, 152), (1, 16, 1, 152), (1, 20, 16, 152), (1, 16, 608), (1, 2048, 608),
          (2, 64, 1024))


def closed_gelu(z):
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * pdf


def broadcast_gelu(z):
    return torch.ops.aten.gelu_backward(z.new_ones(()).expand_as(z), z)


def kept_gelu(z):
    return torch.ops.aten.gelu_backward(torch.ones_like(z), z)


def closed_silu(z):
    sig = torch.sigmoid(z)
    return sig * (1.0 + z * (1.0 - sig))


def kept_silu(z):
    return torch.ops.aten.silu_backward(torch.ones_like(z), z)


def per_call_us(fn, calls):
    for _ in range(20):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - started) / calls * 1e6, 1)


def row(shape: tuple[int, ...]) -> str:
    z = torch.randn(shape)
    grad = torch.randn_like(z)
    calls = 5000 if z.numel() < 1e4 else 1000 if z.numel() < 1e5 else 100
    slopes = {fn.__name__: per_call_us(lambda fn=fn: fn(z), calls)
              for fn in (closed_gelu, broadcast_gelu, kept_gelu, closed_silu, kept_silu)}
    gelus = {}
    for onednn in (True, False):
        torch._C._set_mkldnn_enabled(onednn)
        gelus[onednn] = (per_call_us(lambda: F.gelu(z), calls),
                         per_call_us(lambda: torch.ops.aten.gelu_backward(grad, z), calls))
    torch._C._set_mkldnn_enabled(True)
    return f"{shape} slopes {slopes} gelu/gelu_backward oneDNN {gelus[True]} native {gelus[False]}"


with torch.no_grad():
    for shape in SHAPES:
        print(row(shape))
