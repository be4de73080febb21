"""A whole training step captured as one CUDA graph and replayed, against the eager step.

The memory archs are launch-bound on a GPU (BENCHMARKS.md, "GPU: measured on one H200"): the
host spends about 30 us per kernel and the GPU computes for a tenth of the step. A CUDA graph
replays every kernel of a captured step with one launch, so it measures how fast a step can
be once the host's cost per kernel is gone. A step can only be captured if it never waits
for the device (no host syncs) and keeps its shapes.

Per arch (the matching of ``bench layers``), at ``--batch`` x ``--length`` under bf16
autocast: the eager step (forward, next-token loss, backward) is timed; then the same step is
warmed up on a side stream, captured with ``torch.cuda.graph`` and its replays are timed.
Reported: both tok/s, their ratio, the captured step's loss against the eager step's on the
same batch (the same kernels, so equal up to atomics' summation order), and the error of a
capture that failed, by name. Then the whole training step, the optimizer's too, is captured
(``torch.optim.AdamW(capturable=True)``, its state made on the side stream first) and its
replays timed: ``graph+adamw tok/s``.

The model looks its embedding up with ``index_select`` (``nestlearn.models.lm.embed_ids``),
whose backward does not wait for the GPU as torch's CUDA embedding backward does.

Usage: ``python bench/gpu_graph.py --out results/gpu`` on a CUDA machine (``bench/gpu_check.sh``
runs it). There is no CPU mode: CUDA graphs need a GPU.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nestlearn.benchmarks.common import time_call
from nestlearn.benchmarks.opcount import add_gpu_arguments, rows_per_arch_in_fresh_processes
from nestlearn.models import ModelConfig, build_model

COLUMNS = ["arch", "T", "B", "eager tok/s", "graph tok/s", "speedup", "eager loss",
           "graph loss", "graph+adamw tok/s", "note"]


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Forward and next-token loss under bf16 autocast (its cast cache off: a graph's casts
    must be recomputed on every replay)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        logits, _ = model(ids[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def capture(model: nn.Module, warm_step: Callable[[], Any],
            forward_loss: Callable[[], torch.Tensor],
            after_backward: Callable[[], Any] | None = None,
            ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture ``forward_loss``, its backward and ``after_backward`` as one CUDA graph, after
    ``warm_step`` ran three times on a side stream (as capture requires); returns the graph
    and its static loss."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            warm_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)  # the captured backward allocates the gradients
    with torch.cuda.graph(graph):
        static_loss = forward_loss()
        static_loss.backward()
        if after_backward is not None:
            after_backward()
    return graph, static_loss


def graph_arch(arch: str, config: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """One arch's row: the eager step timed, then captured, replayed and timed."""
    torch.manual_seed(0)
    model = build_model(config).cuda()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length + 1), device="cuda")
    tokens = args.batch * args.length

    def eager_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, ids)
        loss.backward()
        return loss.detach()

    eager_loss = eager_step().item()
    row: dict[str, Any] = {"arch": arch, "T": args.length, "B": args.batch,
                           "eager tok/s": tokens / time_call(eager_step, repeats=args.repeats,
                                                             device="cuda"),
                           "eager loss": eager_loss, "note": ""}
    try:
        graph, static_loss = capture(model, eager_step, lambda: loss_of(model, ids))
        graph.replay()
        row["graph loss"] = static_loss.item()
        row["graph tok/s"] = tokens / time_call(graph.replay, repeats=args.repeats,
                                                device="cuda")
        row["speedup"] = row["graph tok/s"] / row["eager tok/s"]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, capturable=True)

        def optimizer_step() -> torch.Tensor:
            loss = eager_step()
            optimizer.step()
            return loss

        graph, _ = capture(model, optimizer_step, lambda: loss_of(model, ids), optimizer.step)
        row["graph+adamw tok/s"] = tokens / time_call(graph.replay, repeats=args.repeats,
                                                      device="cuda")
    except Exception as err:  # report why a capture failed instead of stopping the table
        row["note"] = f"capture failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        traceback.print_exc(file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_gpu_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_graph: error: CUDA graphs need a CUDA device "
              "(torch.cuda.is_available() is false here)", file=sys.stderr)
        return 2
    rows_per_arch_in_fresh_processes("gpu-graph", COLUMNS, args, "capturing", graph_arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
