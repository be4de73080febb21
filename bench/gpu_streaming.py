"""Float64 streaming parity of every model arch on a device, and against the same model on CPU.

Per arch, a small model (width ``--dim``, memory chunks of a few tokens, so a short stream
crosses many chunk boundaries, a CMS level's held tokens included) reads a ``--length``-token
stream in float64 on ``--device``:

- ``segments``: the stream in segments of 5, 1 and 7 tokens and the rest, the state passed
  from one to the next, against one pass: the logits and every tensor of the final state;
- ``token by token``: one token per call (the decoding paths: a memory's token step, a CMS
  level holding its chunk's tokens), against one pass, the same way;
- ``gradients``: the parameters' gradients of a loss on the segments' logits and final state
  (the state passed on, not detached), against the same loss on one pass;
- ``cpu vs device``: one pass on ``--device`` against one pass of the same weights on CPU:
  logits, final state and the parameters' gradients.

Each cell is the largest relative error ``||a - b|| / ||b||`` over what it compares (a CMS
level's held tokens as their gradient sum, the form of every other segmentation); states that
differ in structure, in a non-tensor value or in a tensor's shape count as ``inf``. Exit code 1
when any cell is above ``--tolerance`` (default 1e-10), 2 when ``--device cuda`` has no CUDA
device. The test suite checks the same contract on CPU (``tests/test_streaming_contract.py``);
this script is for a GPU machine (``bench/gpu_check.sh``), where the kernels differ.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from nestlearn.benchmarks.parity_table import (
    ParityTable,
    check_positive,
    device_missing,
    device_name,
)
from nestlearn.models import ARCHS, ModelConfig, build_model
from nestlearn.nn.cms import ContinuumMemoryState, settled
from nestlearn.nn.self_modifying import SelfModifyingTitansConfig
from nestlearn.state import map_instances, named_tensors

DTYPE = torch.float64
CUTS = (5, 1, 7)  # then the rest of the stream
COLUMNS = ("segments", "token by token", "gradients", "cpu vs device")


def small_config(arch: str, dim: int, vocab: int, chunk: int) -> ModelConfig:
    """``arch`` at width ``dim``, two blocks and two heads; every memory chunk ``chunk`` tokens
    (HOPE's inner one ``chunk - 1``: the two fall out of step), CMS levels of 2 and 6 tokens,
    titans-mag's attention window 4."""
    spec = ARCHS[arch]
    memory = None
    if spec.memory is SelfModifyingTitansConfig:
        memory = {"chunk_size": chunk, "inner_chunk_size": max(chunk - 1, 1)}
    elif spec.memory is not None:
        memory = {"chunk_size": chunk}
    return ModelConfig(arch=arch, vocab_size=vocab, dim=dim, layers=2, heads=2, memory=memory,
                       cms={"chunk_sizes": (2, 6), "inner_lr": 0.05} if spec.cms else None,
                       attention={"window": 4} if arch == "titans-mag" else None)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` (the absolute error where ``want`` is zero), on CPU;
    ``inf`` for tensors of different shapes, except a batch-shared tensor against its
    per-row copies (``[...]`` against ``[B, ...]``, as a memory's meta-learned initial
    weights are held until a row's first update), and for integer tensors that differ."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape:
        if got.shape[1:] != want.shape and want.shape[1:] != got.shape:
            return float("inf")
        got, want = torch.broadcast_tensors(got, want)
    if not want.is_floating_point():
        return 0.0 if torch.equal(got, want) else float("inf")
    scale = want.norm().item()
    difference = (got - want).norm().item()
    return difference / scale if scale > 0 else difference


def comparable(state: Any) -> Any:
    """A final state with each CMS level's held tokens as their gradient sum (the form every
    segmentation's state takes for the same stream)."""
    return map_instances(settled, state, ContinuumMemoryState)


def worst_state_error(got: Any, want: Any) -> float:
    """The largest relative error over the two states' tensors; ``inf`` when they differ in
    structure (classes, fields, static values such as positions) or in a non-tensor leaf."""
    got_leaves, got_spec = pytree.tree_flatten(comparable(got))
    want_leaves, want_spec = pytree.tree_flatten(comparable(want))
    if got_spec != want_spec:
        return float("inf")
    worst = 0.0
    for got_leaf, want_leaf in zip(got_leaves, want_leaves, strict=True):
        if isinstance(got_leaf, torch.Tensor) != isinstance(want_leaf, torch.Tensor):
            return float("inf")
        if not isinstance(want_leaf, torch.Tensor):
            if got_leaf != want_leaf:
                return float("inf")
            continue
        if got_leaf.dtype != want_leaf.dtype:
            return float("inf")
        worst = max(worst, relative_error(got_leaf, want_leaf))
    return worst


def read(model: nn.Module, ids: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, Any]:
    """Logits of the stream read in segments of ``lengths`` tokens, and the final state."""
    state, logits = None, []
    start = 0
    for length in lengths:
        out, state = model(ids[:, start:start + length], state)
        logits.append(out)
        start += length
    return torch.cat(logits, 1), state


def probe_loss(logits: torch.Tensor, state: Any) -> torch.Tensor:
    """A loss that depends on every logit and every floating tensor of the final state."""
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype,
                             device=logits.device).view_as(logits)
    loss = (logits * weights).sum()
    for tensor in named_tensors(comparable(state)).values():
        if tensor.is_floating_point() and tensor.requires_grad:
            loss = loss + tensor.square().sum() / (1 + tensor.numel())
    return loss


def gradients(model: nn.Module, ids: torch.Tensor, lengths: Sequence[int]
              ) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    probe_loss(*read(model, ids, lengths)).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def worst_gradient_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    if got.keys() != want.keys():
        return float("inf")
    return max((relative_error(got[name], want[name]) for name in want), default=0.0)


def arch_errors(arch: str, args: argparse.Namespace) -> dict[str, float]:
    """The four cells of ``arch``'s row (module docstring)."""
    torch.manual_seed(args.seed)
    on_cpu = build_model(small_config(arch, args.dim, args.vocab_size, args.chunk)).to(DTYPE)
    model = copy.deepcopy(on_cpu).to(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch, args.length), generator=generator)
    one_pass = [args.length]
    segments = [*CUTS, args.length - sum(CUTS)]
    with torch.no_grad():
        logits, state = read(model, ids.to(args.device), one_pass)
        errors = {}
        for column, lengths in (("segments", segments),
                                ("token by token", [1] * args.length)):
            got_logits, got_state = read(model, ids.to(args.device), lengths)
            errors[column] = max(relative_error(got_logits, logits),
                                 worst_state_error(got_state, state))
        cpu_logits, cpu_state = read(on_cpu, ids, one_pass)
        errors["cpu vs device"] = max(relative_error(logits, cpu_logits),
                                      worst_state_error(state, cpu_state))
    device_ids = ids.to(args.device)
    one_pass_gradients = gradients(model, device_ids, one_pass)
    errors["gradients"] = worst_gradient_error(gradients(model, device_ids, segments),
                                               one_pass_gradients)
    errors["cpu vs device"] = max(errors["cpu vs device"], worst_gradient_error(
        one_pass_gradients, gradients(on_cpu, ids, one_pass)))
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the models run (default: cuda)")
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS),
                        help="archs to check (default: all)")
    parser.add_argument("--batch", type=int, default=2, help="B (default: 2)")
    parser.add_argument("--length", type=int, default=29,
                        help="T: the stream's tokens; the segments are 5, 1, 7 and the rest "
                             "(default: 29)")
    parser.add_argument("--dim", type=int, default=16, help="model width (default: 16)")
    parser.add_argument("--chunk", type=int, default=4,
                        help="memory chunk; HOPE's inner chunk is one less (default: 4)")
    parser.add_argument("--vocab-size", type=int, default=17, help="vocabulary (default: 17)")
    parser.add_argument("--seed", type=int, default=0, help="weights and stream (default: 0)")
    parser.add_argument("--tolerance", type=float, default=1e-10,
                        help="largest relative error allowed (default: 1e-10)")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("batch", "length", "dim", "chunk", "vocab_size"))
    if args.length <= sum(CUTS):
        parser.error(f"--length: got {args.length}; allowed: integers >= {sum(CUTS) + 1} "
                     f"(the segments are {', '.join(map(str, CUTS))} and the rest)")
    if device_missing("gpu_streaming", args.device):
        return 2
    print(f"float64 streaming parity on {args.device} ({device_name(args.device)}), "
          f"B={args.batch} T={args.length} D={args.dim} chunk {args.chunk}, "
          f"tolerance {args.tolerance:g}")
    table = ParityTable("arch", COLUMNS, args.tolerance)
    for arch in args.archs:
        errors = arch_errors(arch, args)
        table.row(arch, [errors[column] for column in COLUMNS])
    return table.verdict()


if __name__ == "__main__":
    sys.exit(main())
