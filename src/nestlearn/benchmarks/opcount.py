"""Op budget and roofline: torch ops, host syncs and FLOPs per training step of each arch.

For every arch at about the parameter count of the reference Transformer (the same matching
as ``bench layers``), one training step (forward, next-token loss, backward) runs under a
dispatch mode that records every aten op it issues, the backward's included. Reported:

- ``ops/step``: aten ops per step, and ``kernels/step``: those that compute (views, reshapes
  and detaches only relabel memory). On a GPU each computing op is (at least) one kernel
  launch, so this is the launch count a step pays for, counted deterministically on CPU.
- ``syncs/step``: reads of a tensor's value on the host (``.item()``, ``bool()``,
  ``.tolist()``, ``nonzero`` ...) and tensors made of Python data (``torch.tensor``, a copy
  from the host): each stalls a GPU's stream until the device has caught up. Counted by the
  dispatch mode and, for the reads inside autograd's C++ formulas, which a dispatch mode
  changes, by torch's profiler on a second step (per op, the larger count).
- ``param GFLOP/tok`` (analytical): 6 x the weights every token is multiplied by (2 for the
  forward, 4 for the backward), i.e. every 2-D parameter except the embedding table (a lookup;
  it counts when the head is tied to it), persistent tokens and the memories' meta-learned
  initial states, which act in context.
- ``in-context GFLOP/tok``: matmul FLOPs of the step counted with the formulas of
  ``torch.utils.flop_counter`` (attention without its causal mask's savings) minus the
  parametric part: attention and the in-context memories' reads and updates, the CMS levels'
  updates. CMS levels' weights count as parametric: every token is multiplied by them.

With ``--decode-tokens N`` it also counts generation: after reading a prompt of T tokens,
``nestlearn.models.generate`` (greedy) reads the prompt's last token and N - 1 new ones, one
forward each, with the state carried: ``decode kernels/token`` is that count over N (forward
only, no backward), ``decode syncs/token`` the host reads among them (generate reads the
prompt's id range once per call: 1/N).

With ``--compiled`` it also counts the step as ``nestlearn.ops.set_compile(True)`` runs it
(``torch.compile`` of the memories' chunk steps), in a fresh process per arch: one step
compiles (``compile s``), the next is recorded by torch's profiler. A compiled graph is not
seen by a dispatch mode, so both sides are counted from the profiler's event tree the same
way (``profiled_kernels``): every innermost aten op that computes (views and allocations
excluded), plus every kernel the compiler generated (inductor's ``cpp_fused_*`` on CPU,
``triton_*`` on a GPU). ``profiled kernels eager`` is the eager step counted that way (it
differs from ``kernels/step`` by how a few composite ops are split); ``profiled kernels
compiled`` the compiled one. With ``--timing`` as well, the compiled step is timed in the
same fresh process (``compiled tok/s``; that process was compiled with a profiler event per
generated kernel, a small cost the eager timing does not pay). A step that could not be
compiled and ran eagerly is named in the ``note`` column.

With ``--sites N`` it also lists the N places in the package that issue the most kernels
(``kernel_sites.py``: forward by function, backward by autograd node and the function that
recorded it; with ``--decode-tokens`` per decoded token too), written to
``ops-count-sites.json``.

With ``--timing`` (off by default: it needs a quiet machine) it also times the step and this
machine's fp32 matmul rate, and reports the fraction of that rate the step achieves. It also
times the arch's skeleton (``skeleton_config``: every width cut to 2 per head, the same ops in
the same order, almost no arithmetic): ``skeleton s`` is what the step's ops cost whatever
they compute (dispatch, autograd, Python, allocation), and ``fixed share`` that over the
step's time. A share near 1 says the step is bound by how many ops it issues, not by its
FLOPs, so fewer (fused) ops, not faster products, are what would speed it up. With
``--decode-tokens`` as well it times the generation it counts (ms per token, the prompt
untimed) and the same generation of the skeleton: ``decode skeleton ms/token`` is what a
decoded token costs whatever it computes, a floor for eager decoding at this op count.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from nestlearn.benchmarks.common import (
    compile_failures,
    in_fresh_process,
    model_chunks_help,
    progress,
    time_call,
    write_report,
)
from nestlearn.benchmarks.counted_runs import (
    is_kernel,
    make_step,
    prompted_decoder,
    run_decode,
    seeded_step,
)
from nestlearn.benchmarks.kernel_sites import (
    SITE_COLUMNS,
    count_decode_sites,
    count_sites,
    site_rows,
)
from nestlearn.errors import invalid
from nestlearn.models import ARCHS, ModelConfig, build_model
from nestlearn.ops._compile import BACKENDS

# aten ops that hand a value (or a data-dependent size) to the host: a device sync each.
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
                      "unique_consecutive", "unique_dim", "bincount", "repeat_interleave"})
# lift_fresh of a tensor with dims: a tensor of Python data (torch.tensor([...])), on a GPU a
# copy from the host that waits for the stream like a read does. A heuristic from CPU: 0-dim
# ones are not counted (``x[i] = 0.5`` makes one, which fills on the device without a wait),
# so ``torch.tensor(0.5, device="cuda")`` is missed, and a tensor of Python data that stays
# on the CPU is counted.
HOST_COPY_OPS = frozenset({"lift_fresh"})
# Tensor methods that copy to the host without an aten op on CPU (on a GPU: a copy and a sync).
SYNC_METHODS = ("tolist", "numpy", "__array__")
# Parameters that are not multiplied with every token (see the module doc).
NON_PARAMETRIC = ("embed.", "persistent", "memory_weights", "inner_weights")

COLUMNS = ["arch", "params", "T", "chunk", "inner chunk", "ops/step", "kernels/step",
           "syncs/step", "kernels/token", "param GFLOP/tok", "in-context GFLOP/tok"]
DECODE_COLUMNS = ["decode kernels/token", "decode syncs/token"]
COMPILED_COLUMNS = ["profiled kernels eager", "profiled kernels compiled", "compile s", "note"]
# aten ops that only relabel or allocate memory: no kernel of their own in a profile (their
# children, e.g. the copy inside a reshape of a strided tensor, are counted).
NON_COMPUTING = frozenset({
    "aten::view", "aten::as_strided", "aten::transpose", "aten::t", "aten::reshape",
    "aten::_reshape_alias", "aten::expand", "aten::permute", "aten::select", "aten::slice",
    "aten::unsqueeze", "aten::squeeze", "aten::split", "aten::split_with_sizes",
    "aten::unbind", "aten::alias", "aten::detach", "aten::_unsafe_view", "aten::lift_fresh",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::unflatten",
    "aten::flatten", "aten::narrow", "aten::chunk", "aten::diagonal", "aten::contiguous",
    "aten::resolve_conj", "aten::resolve_neg", "aten::expand_as", "aten::view_as",
    "aten::result_type", "aten::is_nonzero", "aten::movedim", "aten::swapaxes"})
# Names of the kernels a compiler generates, as they appear in a profile.
GENERATED_KERNELS = ("cpp_fused", "triton_")
TIMING_COLUMNS = ["tok/s", "GFLOP/s", "fraction of matmul rate", "skeleton s", "fixed share"]
DECODE_TIMING_COLUMNS = ["decode ms/token", "decode skeleton ms/token", "decode fixed share"]
SKELETON_HEAD_DIM = 2


class OpCounter(TorchDispatchMode):
    """Counts the aten ops issued while active (by name), the host syncs among them and their
    matmul FLOPs (torch's FLOP formulas, without its module tracking, which is slow).

    ``.tolist()``/``.numpy()`` read CPU memory directly (no aten op), so the tensor methods in
    ``SYNC_METHODS`` are wrapped while the counter is active as well."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.flops = 0
        self._saved: dict[str, Callable] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if is_kernel(func):
            self.kernels[name] += 1
        if name in SYNC_OPS or (name in HOST_COPY_OPS and args[0].dim() > 0):
            self.syncs[name] += 1
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out

    def __enter__(self) -> OpCounter:
        for method in SYNC_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original
            setattr(torch.Tensor, method, self._counted(method, original))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
            self._saved.clear()

    def _counted(self, method: str, original: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.syncs[method] += 1
            return original(*args, **kwargs)

        return counted

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_kernels(self) -> int:
        return sum(self.kernels.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


def _cpu_sdpa_flop(query, key, value, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args: Any, out_shape=None,
                            **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's formulas plus the CPU's fused attention, which they leave out (its GPU kernels not).
FLOP_FORMULAS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_sdpa_flop),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        shape_wrapper(_cpu_sdpa_backward_flop),
}


def parametric_weights(model: nn.Module) -> int:
    """Weights every token is multiplied by once in the forward (see the module doc)."""
    tied_head = getattr(model, "head", 0) is None  # the head reuses the embedding table

    def per_token(name: str, param: nn.Parameter) -> bool:
        if tied_head and name.endswith("embed.weight"):
            return True
        return param.dim() >= 2 and not any(marker in name for marker in NON_PARAMETRIC)

    return sum(p.numel() for name, p in model.named_parameters() if per_token(name, p))


def profiled_syncs(step: Callable[[], Any]) -> Counter[str]:
    """Host reads (``SYNC_OPS``) by op name in one ``step()`` as torch's profiler records it.
    It sees the reads inside autograd's own formulas, which a dispatch mode does not: while
    one is active torch takes their read-free forms (cumprod's backward checks for zeros with
    ``.item()`` only without one)."""
    from torch.profiler import ProfilerActivity, profile

    def sync_name(event: Any) -> str | None:
        name = event.name.removeprefix("aten::")
        return name if name in SYNC_OPS else None

    def inside_a_sync(event: Any) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if sync_name(parent):
                return True
            parent = parent.cpu_parent
        return False

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    # one read per outermost sync op (repeat_interleave's read nests another)
    return Counter(sync_name(event) for event in prof.events()
                   if sync_name(event) and not inside_a_sync(event))


def count_step(config: ModelConfig, length: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """Ops, syncs and FLOPs of one training step of ``config`` at ``batch`` x ``length``; the
    syncs are the larger count, by op, of the dispatch mode's and the profiler's."""
    model, step = seeded_step(config, length, batch, seed)
    with OpCounter() as ops:
        step()
    syncs = ops.syncs | profiled_syncs(step)
    tokens = batch * length
    param_flops = 6 * parametric_weights(model)
    total_flops = ops.flops
    return {"arch": config.arch, "dim": config.dim, "layers": config.layers,
            "params": sum(p.numel() for p in model.parameters()), "T": length, "B": batch,
            "ops/step": ops.total_ops, "kernels/step": ops.total_kernels,
            "syncs/step": sum(syncs.values()), "kernels/token": ops.total_kernels / tokens,
            "param GFLOP/tok": param_flops / 1e9,
            "in-context GFLOP/tok": (total_flops / tokens - param_flops) / 1e9,
            "matmul GFLOP/step": total_flops / 1e9,
            "syncs by op": dict(syncs),
            "top kernels": dict(ops.kernels.most_common(20))}


def count_decode(config: ModelConfig, length: int, batch: int, tokens: int,
                 seed: int = 0) -> dict[str, Any]:
    """Kernels and syncs per token of greedy generation after a prompt of ``length`` tokens
    (see the module doc): ``tokens`` forwards of one token each, the state carried."""
    ops = OpCounter()
    run_decode(config, length, batch, tokens, ops, seed)
    return {"decode tokens": tokens, "decode ops/token": ops.total_ops / tokens,
            "decode kernels/token": ops.total_kernels / tokens,
            "decode syncs/token": ops.total_syncs / tokens,
            "decode matmul MFLOP/token": ops.flops / tokens / 1e6,
            "decode top kernels": dict(ops.kernels.most_common(20))}


def profiled_kernels(events: Any) -> int:
    """Kernels in a profile's event tree (``profile.events()``): generated kernels, and the
    innermost computing aten op of every nest (``aten::matmul`` counts as its ``bmm``)."""

    def count(event: Any) -> int:
        if any(tag in event.name for tag in GENERATED_KERNELS):
            return 1
        inner = sum(count(child) for child in event.cpu_children)
        if inner or not event.name.startswith("aten::"):
            return inner
        return 0 if event.name in NON_COMPUTING else 1

    return sum(count(event) for event in events if event.cpu_parent is None)


def profile_step(config_dict: dict[str, Any], length: int, batch: int, compiled: bool,
                 repeats: int, backend: str = "inductor") -> dict[str, Any]:
    """Profiled kernels of one training step (eager, or compiled after one compiling step),
    and with ``repeats`` > 0 its median seconds; run in a fresh process (``--compiled``)."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from nestlearn.ops import set_compile

    inductor_config.cpp.enable_kernel_profile = True  # a profiler event per generated kernel
    set_compile(compiled, backend=backend)
    _, step = seeded_step(ModelConfig.from_dict(config_dict), length, batch)
    notes: list[str] = []
    with compile_failures(notes):  # a step that fell back to eager is named, not hidden
        started = time.perf_counter()
        step()  # compiles every graph the step needs (the eager side: warms up)
        first = time.perf_counter() - started
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        result: dict[str, Any] = {"kernels": profiled_kernels(prof.events()), "first s": first}
        if repeats:
            result["seconds"] = time_call(step, repeats=repeats, warmup=0)
    result["note"] = "; ".join(notes)
    return result


def count_compiled(config: ModelConfig, length: int, batch: int, timing: bool,
                   repeats: int, threads: int, backend: str = "inductor") -> dict[str, Any]:
    """The ``--compiled`` columns of one arch: each side in a fresh process."""
    from nestlearn.benchmarks.common import in_fresh_process

    sides = {compiled: in_fresh_process(profile_step, config.to_dict(), length, batch,
                                        compiled, repeats if timing else 0, backend,
                                        threads=threads)
             for compiled in (False, True)}
    row = {"profiled kernels eager": sides[False]["kernels"],
           "profiled kernels compiled": sides[True]["kernels"],
           "compile s": sides[True]["first s"], "note": sides[True]["note"]}
    if timing:
        row["compiled tok/s"] = batch * length / sides[True]["seconds"]
    return row


def matmul_rate(size: int = 1024, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate in FLOP/s (median of ``repeats`` square matmuls)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / time_call(lambda: a @ b, repeats=repeats, warmup=2)


def time_step(config: ModelConfig, length: int, batch: int, repeats: int) -> float:
    """Median seconds of one training step (forward and backward)."""
    torch.manual_seed(0)
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (batch, length + 1))
    return time_call(make_step(model, ids), repeats=repeats, warmup=1)


def time_decode(config: ModelConfig, length: int, batch: int, tokens: int,
                repeats: int) -> float:
    """Median seconds per token of greedy generation of ``tokens`` tokens after a prompt of
    ``length`` tokens (the generation the decode counts count; the prompt is not timed)."""
    decode = prompted_decoder(config, length, batch, tokens)
    return time_call(decode, repeats=repeats, warmup=1) / tokens


def decode_timing(config: ModelConfig, length: int, batch: int, tokens: int,
                  repeats: int) -> dict[str, float]:
    """The ``--timing --decode-tokens`` columns: ms per decoded token, the same for the arch's
    skeleton (the decoding's fixed cost), and their ratio."""
    seconds = time_decode(config, length, batch, tokens, repeats)
    skeleton = time_decode(skeleton_config(config), length, batch, tokens, repeats)
    return {"decode ms/token": seconds * 1e3, "decode skeleton ms/token": skeleton * 1e3,
            "decode fixed share": skeleton / seconds}


def skeleton_config(config: ModelConfig, head_dim: int = SKELETON_HEAD_DIM) -> ModelConfig:
    """``config`` with every width cut to ``head_dim`` per head (model, memory and CMS widths;
    hidden sizes follow them): the same layers, heads, depth, chunks and vocabulary, so one
    step issues the same ops in the same order (``tests/test_bench_opcount.py`` checks the
    counts) with almost no arithmetic. Its step time is the ops' fixed cost."""
    dim = config.heads * head_dim
    sections: dict[str, Any] = {}
    if config.memory is not None:
        sections["memory"] = dataclasses.replace(config.memory, dim=dim,
                                                 head_dim=dim // config.memory.heads)
    if config.cms is not None:
        sections["cms"] = dataclasses.replace(config.cms, dim=dim, hidden=None)
    return dataclasses.replace(config, dim=dim, mlp_hidden=None, **sections)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archs", nargs="+", default=list(ARCHS),
                        help=f"models to count, from {', '.join(ARCHS)} (default: all)")
    parser.add_argument("--length", type=int, default=2048,
                        help="sequence length T (default: 2048)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default: 1)")
    parser.add_argument("--model-dim", type=int, default=256,
                        help="width of the reference Transformer (default: 256)")
    parser.add_argument("--model-layers", type=int, default=4,
                        help="blocks of every model (default: 4)")
    parser.add_argument("--heads", type=int, default=4, help="heads (default: 4)")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help=f"memory chunk size; {model_chunks_help()} (default: 64)")
    parser.add_argument("--inner-chunk-size", type=int, default=None,
                        help="chunk of HOPE's inner memories on its own "
                             "(default: --chunk-size)")
    parser.add_argument("--cms-chunk-sizes", type=int, nargs="+", default=[64, 512],
                        help="CMS level chunk sizes (default: 64 512)")
    parser.add_argument("--window", type=int, default=512,
                        help="sliding window of titans-mag's attention (default: 512)")
    parser.add_argument("--vocab-size", type=int, default=256, help="vocabulary (default: 256)")
    parser.add_argument("--decode-tokens", type=int, default=0,
                        help="also count greedy generation of this many tokens after a "
                             "prompt of --length tokens, per token (default: 0, off)")
    parser.add_argument("--compiled", action="store_true",
                        help="also count (and with --timing time) the step compiled "
                             "(nestlearn.ops.set_compile), each side in a fresh process; "
                             "compiling takes minutes per arch")
    parser.add_argument("--compile-backend", default="inductor", choices=BACKENDS,
                        help="torch.compile backend of --compiled (default: inductor; "
                             "aot_eager only traces, in seconds)")
    parser.add_argument("--timing", action="store_true",
                        help="also time each step, its skeleton (the same ops at width 2 per "
                             "head: their fixed cost) and the fp32 matmul rate, and with "
                             "--decode-tokens the decoding per token and its skeleton's (needs "
                             "a quiet machine; counts alone are deterministic)")
    parser.add_argument("--sites", type=int, default=0, metavar="N",
                        help="also list the N sources (package functions, and the autograd "
                             "nodes they record) that issue the most kernels per step, "
                             "forward and backward apart (with --decode-tokens also per "
                             "decoded token); written to ops-count-sites.json "
                             "(default: 0, off)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per arch with --timing, median reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's current setting)")
    parser.add_argument("--out", default="results/bench",
                        help="folder for the JSON report (default: results/bench)")


def add_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    """``add_arguments`` with the defaults of the GPU scripts (``bench/gpu_*.py``): every arch,
    cheapest first (a run cut short keeps the most rows), B=8, results in results/gpu."""
    add_arguments(parser)
    parser.set_defaults(archs=["transformer", "titans", "titans-mag", "hope-attention", "hope"],
                        batch=8, out="results/gpu")


def rows_per_arch_in_fresh_processes(report: str, columns: list[str],
                                     args: argparse.Namespace, doing: str,
                                     measure: Callable[[str, ModelConfig, argparse.Namespace],
                                                       dict[str, Any]]
                                     ) -> list[dict[str, Any]]:
    """``measure(arch, config, args)`` for each arch of ``model_configs(args)``, each in a
    fresh process (a failed CUDA graph capture can leave CUDA unusable in its process), the
    report ``report`` written after every row; a process that died or raised outside
    ``measure``'s own handling gives a row whose note says why. ``doing`` names the work in
    the progress line."""
    rows: list[dict[str, Any]] = []
    for arch, config in model_configs(args).items():
        progress(f"{doing} {arch} T={args.length} B={args.batch}")
        try:
            rows.append(in_fresh_process(measure, arch, config, args))
        except RuntimeError as err:
            rows.append({"arch": arch, "T": args.length, "B": args.batch,
                         "note": f"failed: {str(err).strip().splitlines()[-1][:200]}"})
        write_report(report, rows, columns, args.out)
    return rows


def model_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    """Each arch at about the Transformer's parameter count, as ``bench layers`` builds them."""
    from nestlearn.benchmarks.layers import matched_config

    base = ModelConfig(arch="transformer", vocab_size=args.vocab_size, dim=args.model_dim,
                       layers=args.model_layers, heads=args.heads)
    inner = args.inner_chunk_size or args.chunk_size
    sections = {"memory": {"chunk_size": args.chunk_size, "inner_chunk_size": inner},
                "cms": {"chunk_sizes": tuple(args.cms_chunk_sizes)}}
    return {arch: base if arch == "transformer"
            else matched_config(arch, base, args.window, sections)
            for arch in args.archs}


def _check_args(args: argparse.Namespace) -> None:
    for name in args.archs:
        if name not in ARCHS:
            raise invalid("--archs", repr(name), f"names from {', '.join(ARCHS)}")
    if isinstance(args.decode_tokens, bool) or args.decode_tokens < 0:
        raise invalid("--decode-tokens", args.decode_tokens, "an integer >= 0 (0 = off)")
    if args.sites < 0:
        raise invalid("--sites", args.sites, "an integer >= 0 (0 = off)")
    for name in ("length", "batch", "model_dim", "model_layers", "heads", "chunk_size",
                 "inner_chunk_size", "cms_chunk_sizes", "window", "vocab_size", "repeats",
                 "threads"):
        value = getattr(args, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item < 1:
                raise invalid(f"--{name.replace('_', '-')}", item, "integers >= 1")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    configs = model_configs(args)
    rate = matmul_rate() if args.timing else None
    rows, sites = [], []
    for arch, config in configs.items():
        progress(f"ops-count {arch} T={args.length}")
        row = count_step(config, args.length, args.batch)
        row["threads"] = torch.get_num_threads()
        row["chunk"] = args.chunk_size if config.memory is not None else "-"
        row["inner chunk"] = getattr(config.memory, "inner_chunk_size", "-")
        if args.decode_tokens:
            row.update(count_decode(config, args.length, args.batch, args.decode_tokens))
        if args.compiled:
            row.update(count_compiled(config, args.length, args.batch, rate is not None,
                                      args.repeats, torch.get_num_threads(),
                                      args.compile_backend))
        if rate is not None:
            seconds = time_step(config, args.length, args.batch, args.repeats)
            skeleton = time_step(skeleton_config(config), args.length, args.batch,
                                 args.repeats)
            achieved = row["matmul GFLOP/step"] * 1e9 / seconds
            row.update({"tok/s": args.batch * args.length / seconds,
                        "GFLOP/s": achieved / 1e9, "fraction of matmul rate": achieved / rate,
                        "matmul GFLOP/s": rate / 1e9, "skeleton s": skeleton,
                        "fixed share": skeleton / seconds})
            if args.decode_tokens:
                row.update(decode_timing(config, args.length, args.batch, args.decode_tokens,
                                         args.repeats))
        rows.append(row)
        if args.sites:
            progress(f"ops-count {arch} T={args.length}: kernels by site")
            sites.extend(site_rows(arch, count_sites(config, args.length, args.batch),
                                   args.sites))
            if args.decode_tokens:
                sites.extend(site_rows(arch, count_decode_sites(
                    config, args.length, args.batch, args.decode_tokens), args.sites,
                    per=args.decode_tokens))
    columns = (COLUMNS + (DECODE_COLUMNS if args.decode_tokens else [])
               + (TIMING_COLUMNS if rate is not None else [])
               + (DECODE_TIMING_COLUMNS if rate is not None and args.decode_tokens else [])
               + (COMPILED_COLUMNS if args.compiled else [])
               + (["compiled tok/s"] if args.compiled and rate is not None else []))
    write_report("ops-count", rows, columns, args.out)
    if sites:
        write_report("ops-count-sites", sites, SITE_COLUMNS, args.out)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
