"""A stand-in for CUDA graphs on CPU, for the tests of ``nestlearn.training.cuda_graph``.

A replay reruns the captured function and writes its outputs and gradients into the tensors
the capture returned, which is what a graph's kernels do. Unlike a real graph it reruns
Python, so it cannot show a value baked in at capture time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ReplayByRerun:
    """Warm-up runs in place; a replay reruns the captured function and copies its outputs
    and gradients into the capture's tensors (a graph writes the same memory every replay)."""

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.parameters = parameters
        self.captures = 0

    def warm(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        # a real capture's backward must allocate the gradients (not add to older ones)
        assert all(p.grad is None for p in self.parameters)
        self.captures += 1
        outputs = fn()  # a real capture records without running: outputs are overwritten
        static_grads = [p.grad for p in self.parameters]

        def replay() -> None:
            # a replay writes the static tensors and leaves the .grad attributes as they are
            before = [p.grad for p in self.parameters]
            for p in self.parameters:
                p.grad = None
            for static, fresh in zip(outputs, fn(), strict=True):
                static.copy_(fresh)
            for p, static, grad in zip(self.parameters, static_grads, before, strict=True):
                if static is not None:
                    static.copy_(p.grad)
                p.grad = grad

        return replay, outputs
