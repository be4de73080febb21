"""A training step's forward and backward captured once as a CUDA graph, then replayed.

The memory models are launch-bound on a GPU: their chunk loops issue tens of thousands of
small kernels per step, and the host spends about 30 us on each while the GPU computes for a
tenth of the step (BENCHMARKS.md, "GPU: measured on one H200"). A CUDA graph replays every
kernel of a captured step with one launch. ``bench/gpu_graph.py``, which captures a step the
same way (side-stream warm-up, then ``torch.cuda.graph``), measured replays 6-10x faster than
the eager step on an H200 (B=8, T=2048, bf16) for titans, titans-mag, hope-attention and
hope, with the same loss; this class itself has not yet run on a GPU
(``bench/gpu_train_graph.py`` is its check).

What is captured: ``loss_fn(*inputs)`` and the backward of its first output, which writes the
parameters' ``.grad``. What is not: the optimizer step, clipping and the checks, which run
eagerly after each replay (so a non-finite loss or gradient is seen before any update, and
every optimizer and schedule works unchanged).

What a captured step needs: no host syncs (``tests/test_no_host_sync.py`` counts them on CPU
for every arch; a CUDA-only read is not seen there), no RNG-state reads (activation
checkpointing's), and the same shapes and Python-side values on every call. Inputs of a new
shape get their own graph, captured after their own warm-up, and keep its memory pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nestlearn.errors import NestlearnError

LossFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...]"]


class CudaGraphBackend:
    """Warm-up on a side stream and capture with ``torch.cuda.graph``, as CUDA requires."""

    def __init__(self) -> None:
        self.side_stream: torch.cuda.Stream | None = None

    def warm(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on a side stream: lazy set-up (library handles and workspaces, compiled
        code, optimizer state) must happen before a capture and off the capturing stream."""
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream()
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            result = fn()
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return result

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """``(replay, outputs)``: ``fn`` recorded (not run) as one graph."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()
        return graph.replay, outputs


@dataclass
class _Captured:
    replay: Callable[[], None]
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]
    grads: list[torch.Tensor | None]


class GraphedBackward:
    """``loss_fn(*inputs)`` and its backward, replayed from a CUDA graph after ``warmup_steps``
    eager calls per input shape.

    Every call is one real step: it leaves the gradients of ``loss_fn``'s first output in the
    parameters' ``.grad`` (replacing, not adding to, what was there) and returns ``loss_fn``'s
    outputs, detached copies. The eager warm-up calls run on a side stream; the capturing call
    records the graph and then replays it for its own inputs. Callers may zero or drop the
    gradients between calls (``zero_grad(set_to_none=True)``): each replay puts them back.

    ``backend`` (default: CUDA) makes the warm-up stream and the capture; a capture that
    fails raises :class:`~nestlearn.errors.NestlearnError` naming the cause.
    """

    def __init__(self, loss_fn: LossFn, parameters: Iterable[torch.nn.Parameter], *,
                 warmup_steps: int = 3, backend: Any = None) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise NestlearnError(f"warmup_steps: got {warmup_steps!r}; allowed: an int >= 1 "
                                 "(CUDA needs eager steps on a side stream before a capture)")
        self.loss_fn = loss_fn
        self.parameters = [p for p in parameters if p.requires_grad]
        self.warmup_steps = warmup_steps
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.warm_calls: dict[tuple[Any, ...], int] = {}
        self.graphs: dict[tuple[Any, ...], _Captured] = {}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        captured = self.graphs.get(key)
        if captured is None:
            done = self.warm_calls.get(key, 0)
            if done < self.warmup_steps:
                self.warm_calls[key] = done + 1
                return self.backend.warm(lambda: self._eager_step(inputs))
            captured = self.graphs[key] = self._capture(inputs)
        for static, given in zip(captured.inputs, inputs, strict=True):
            static.copy_(given)
        captured.replay()
        for parameter, grad in zip(self.parameters, captured.grads, strict=True):
            parameter.grad = grad
        return tuple(output.clone() for output in captured.outputs)

    def _clear_grads(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def _eager_step(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        self._clear_grads()
        outputs = _as_tuple(self.loss_fn(*inputs))
        outputs[0].backward()
        return tuple(output.detach() for output in outputs)

    def _capture(self, inputs: Sequence[torch.Tensor]) -> _Captured:
        static_inputs = tuple(t.detach().clone() for t in inputs)

        def step() -> tuple[torch.Tensor, ...]:
            outputs = _as_tuple(self.loss_fn(*static_inputs))
            outputs[0].backward()
            return tuple(output.detach() for output in outputs)

        self._clear_grads()  # the captured backward allocates gradients the graph owns
        try:
            replay, outputs = self.backend.capture(step)
        except Exception as err:
            self._clear_grads()
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise NestlearnError(
                f"the training step could not be captured as a CUDA graph: "
                f"{type(err).__name__}: {first_line[:300]}. A captured step must not wait for "
                "the GPU (no .item(), .tolist() or data-dependent shapes), read the RNG state "
                "or run out of memory; run without the CUDA graph (train.cuda_graph=false, "
                "or bench layers --cuda-graph off)"
            ) from err
        return _Captured(replay, static_inputs, outputs,
                         [parameter.grad for parameter in self.parameters])


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)
