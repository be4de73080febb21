"""Layers and models: forward+backward tokens/s, peak memory, decode latency per token.

Four sections (``--sections``):
- ``layers``: each layer alone at width ``--dim`` (attention, Transformer++ block, Titans
  neural memory, self-modifying Titans, CMS, HOPE block, HOPE-attention block), forward and
  backward at every length in ``--lengths``;
- ``models``: each architecture's causal LM at about the parameter count of the Transformer
  of ``--model-dim`` x ``--model-layers`` (the width of the others is chosen to match it),
  once per ``--checkpoint-segment`` value (activation checkpointing over segments of that
  many tokens, ``ModelConfig.checkpoint_segment``; ``off`` = none), side by side;
- ``decode``: after reading a context of each length in ``--decode-contexts`` (in segments,
  with state), the mean latency per generated token and the size of the carried state
  (recurrent models: flat; attention's KV cache: growing);
- ``titans-pytorch``: when that package is importable, its ``NeuralMemory(dim, chunk_size)``
  side by side with ours at the same configuration (one head, 2-layer memory MLP with
  expansion 4, momentum on), forward and backward, same thread count, each timed in a fresh
  process of its own after the same warm-up (``benchmarks/titans_compare.py``); our layer's
  float64 error against its per-token reference is reported beside it.
Every memory's chunk is ``--chunk-size`` (HOPE's inner chunk too, unless
``--inner-chunk-size`` sets it; an ``inner chunk`` column); several values run side by side (a
``chunk`` column; layers and archs without a chunked memory run once, shown ``-``).
Peak memory is measured in a fresh process per cell (``--no-memory`` skips it); on CUDA it
is ``torch.cuda.max_memory_allocated`` during one pass instead.

Each cell of ``layers``, ``models`` and ``decode`` runs on ``--device`` (cpu or cuda; CUDA
timings synchronize around each timed call), with the forward under
``torch.autocast(device, bfloat16)`` when ``--autocast bf16``, and once per ``--compile``
value (``on``: the memories' steps under ``torch.compile``, ``nestlearn.ops.set_compile``
with ``--compile-backend``; decode cells read each token with the whole model compiled,
``nestlearn.models.token_reader``). A compiled cell runs in a fresh process of its own, and so does
every cell when ``--compile`` or ``--chunk-size`` has several values, so compiled code and
allocator state cannot leak from one cell into the next; its first call (compiling included)
is timed apart (``compile s``), tok/s is the median of ``--repeats`` runs after one more
warm-up call. A chunk step that failed to compile (and ran eagerly) is named in the ``note`` column.

``--cuda-graph on`` (models, on CUDA) replays each model's forward and backward from a CUDA
graph, as ``train.cuda_graph`` does (``nestlearn.training.cuda_graph``): three eager warm-up
calls and the capture happen before the first timed call (their time is the JSON's ``setup
s``, and ``compile s`` under ``--compile on``, compiling included), and a capture that fails
is named in the note. A replay allocates nothing, so a graphed cell's peak MB is taken over
its warm-up and capture, the model's parameters included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import math
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nestlearn.benchmarks.common import (
    compile_failures,
    cuda_peak_mb,
    in_fresh_process,
    measure,
    model_chunks_help,
    peak_memory_mb,
    progress,
    time_call,
    timed_once,
    write_json,
    write_report,
)
from nestlearn.benchmarks.titans_compare import (
    MALLOC_SETTINGS,
    TITANS_COLUMNS,
    TUNED_MALLOC,
    titans_pytorch_available,
    titans_rows,
)
from nestlearn.errors import NestlearnError, NonFiniteError, invalid
from nestlearn.models import ARCHS, ArchSpec, ModelConfig, build_model, token_reader
from nestlearn.ops import set_compile
from nestlearn.state import tensors
from nestlearn.training.cuda_graph import GraphedBackward

LAYERS: tuple[str, ...] = ("attention", "transformer-block", "neural-memory",
                           "self-modifying-titans", "cms", "hope-block", "hope-attention-block")
SECTIONS: tuple[str, ...] = ("layers", "models", "decode", "titans-pytorch")

DEVICES: tuple[str, ...] = ("cpu", "cuda")
AUTOCAST: tuple[str, ...] = ("off", "bf16")
COMPILE: tuple[str, ...] = ("off", "on")
COMPILE_BACKENDS: tuple[str, ...] = ("inductor", "aot_eager")

MODE_COLUMNS = ["device", "autocast", "compile"]
LAYER_COLUMNS = ["layer", "T", "chunk", "inner chunk", "params", *MODE_COLUMNS, "tok/s",
                 "compile s", "peak MB", "note"]
MODEL_COLUMNS = ["arch", "dim", "params", "T", "B", "chunk", "inner chunk", "checkpoint segment",
                 *MODE_COLUMNS, "cuda graph", "tok/s", "compile s", "peak MB", "note"]
DECODE_COLUMNS = ["arch", "context", "chunk", "inner chunk", *MODE_COLUMNS, "ms/token", "compile s",
                  "state MB", "largest state MB", "note"]
# The layers whose speed depends on the memory chunk size (the others run once, chunk "-").
CHUNKED_LAYERS: tuple[str, ...] = ("neural-memory", "self-modifying-titans", "hope-block")
# The layers with HOPE's inner memories (their chunk: --inner-chunk-size).
INNER_CHUNKED_LAYERS: tuple[str, ...] = ("self-modifying-titans", "hope-block")
NO_CHUNK = "-"


@dataclasses.dataclass(frozen=True)
class RunMode:
    """How a cell runs: its device, autocast (``off`` or ``bf16``), compiled memory steps and,
    for a model, its forward and backward replayed from a CUDA graph."""

    device: str = "cpu"
    autocast: str = "off"
    compile: bool = False
    backend: str = "inductor"
    cuda_graph: bool = False

    def row(self) -> dict[str, str]:
        """The mode's columns of a result row (``cuda graph`` in the models section's own)."""
        return {"device": self.device, "autocast": self.autocast,
                "compile": "on" if self.compile else "off"}


def autocast(device: str, mode: str, cache_enabled: bool = True
             ) -> contextlib.AbstractContextManager:
    """``torch.autocast(device, bfloat16)`` when ``mode`` is ``bf16``; a no-op for ``off``.
    ``cache_enabled=False`` recasts the weights on every call, as a CUDA graph's replays
    must."""
    if mode == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16, cache_enabled=cache_enabled)
    return contextlib.nullcontext()


def _layer_configs(dim: int, heads: int, chunk_size: int, cms_chunk_sizes: list[int],
                   inner_chunk_size: int | None = None) -> dict[str, ModelConfig]:
    """One-block configs of each arch whose layers are measured, at the requested sizes (the
    memories' chunks ``chunk_size``, HOPE's inner chunk ``inner_chunk_size``, None: the
    same)."""
    memory = {"chunk_size": chunk_size}
    cms = {"chunk_sizes": tuple(cms_chunk_sizes)}
    shared = {"dim": dim, "heads": heads, "layers": 1}
    return {"transformer": ModelConfig(arch="transformer", **shared),
            "titans": ModelConfig(arch="titans", memory=memory, **shared),
            "hope": ModelConfig(arch="hope",
                                memory={**memory, "inner_chunk_size": inner_chunk_size
                                        or chunk_size}, cms=cms, **shared),
            "hope-attention": ModelConfig(arch="hope-attention", cms=cms, **shared)}


def build_layer(name: str, configs: dict[str, ModelConfig]) -> nn.Module:
    """The layer ``name`` at the sizes of ``configs`` (``forward(x, state) -> (y, state)``)."""
    from nestlearn.models.archs import hope_attention_block, hope_block, transformer_block
    from nestlearn.nn.cms import ContinuumMemory
    from nestlearn.nn.self_modifying import SelfModifyingTitans
    from nestlearn.nn.titans import NeuralMemory
    from nestlearn.nn.transformer import CausalSelfAttention

    hope = configs["hope"]
    builders: dict[str, Callable[[], nn.Module]] = {
        "attention": lambda: CausalSelfAttention(hope.dim, hope.heads),
        "transformer-block": lambda: transformer_block(configs["transformer"]),
        "neural-memory": lambda: NeuralMemory(configs["titans"].memory),
        "self-modifying-titans": lambda: SelfModifyingTitans(hope.memory),
        "cms": lambda: ContinuumMemory(hope.cms_layer_config()),
        "hope-block": lambda: hope_block(hope),
        "hope-attention-block": lambda: hope_attention_block(configs["hope-attention"]),
    }
    return builders[name]()


def make_layer_workload(layer: str, dim: int, heads: int, chunk_size: int,
                        cms_chunk_sizes: list[int], length: int, batch: int,
                        seed: int = 0, device: str = "cpu", autocast_mode: str = "off",
                        inner_chunk_size: int | None = None) -> Callable[[], torch.Tensor]:
    """One forward+backward pass of a layer (module level: the memory probe imports it)."""
    torch.manual_seed(seed)
    module = build_layer(layer, _layer_configs(dim, heads, chunk_size, cms_chunk_sizes,
                                               inner_chunk_size))
    module.to(device)
    x = torch.randn(batch, length, dim, device=device, requires_grad=True)

    def workload() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(device, autocast_mode):
            y, _ = module(x)
            loss = y.float().square().mean()
        loss.backward()
        return loss.detach()

    return workload


def make_model_workload(config: dict[str, Any], length: int, batch: int,
                        seed: int = 0, device: str = "cpu", autocast_mode: str = "off",
                        cuda_graph: bool = False) -> Callable[[], torch.Tensor]:
    """One forward+backward pass (next-token loss) of a causal LM. With ``cuda_graph`` the
    pass is replayed from a CUDA graph (``GraphedBackward``), warmed up and captured before
    this returns."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_dict(config)).to(device)
    ids = torch.randint(0, model.config.vocab_size, (batch, length + 1), device=device)
    if model.config.checkpoint_segment is not None:
        # The first checkpoint call of a process imports torch._dynamo (~75 MB resident): a
        # one-time cost, paid here so that the peak-memory probe measures the pass itself.
        probe = torch.ones(1, requires_grad=True)
        checkpoint(torch.mul, probe, probe, use_reentrant=False).backward()

    def loss_of(tokens: torch.Tensor) -> torch.Tensor:
        with autocast(device, autocast_mode, cache_enabled=not cuda_graph):
            logits, _ = model(tokens[:, :-1])
            return nn.functional.cross_entropy(logits.flatten(0, 1).float(),
                                               tokens[:, 1:].flatten())

    if cuda_graph:
        graphed = GraphedBackward(loss_of, model.parameters())
        for _ in range(graphed.warmup_steps + 1):  # warm-up steps, then the capture
            graphed(ids)
        return lambda: graphed(ids)[0]

    def workload() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_of(ids)
        loss.backward()
        return loss.detach()

    return workload


def count_parameters(config: ModelConfig) -> int:
    """Parameters of ``build_model(config)``, counted without allocating them."""
    with torch.device("meta"):
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def matched_config(arch: str, base: ModelConfig, window: int,
                   sections: dict[str, Any] | None = None) -> ModelConfig:
    """``arch`` at the width whose parameter count is closest to ``base``'s; ``sections``
    holds the memory and CMS options (``{"memory": {...}, "cms": {...}}``) for the archs that
    have them."""
    target = count_parameters(base)
    step = 2 * base.heads
    best: tuple[int, ModelConfig] | None = None
    sections = sections or {}
    for dim in range(step, 4 * base.dim + 1, step):
        spec = ARCHS[arch]
        options = {"attention": {"window": window} if arch == "titans-mag" else None,
                   "memory": _memory_options(spec, sections.get("memory", {})),
                   "cms": sections.get("cms") if spec.cms else None}
        config = dataclasses.replace(base, arch=arch, dim=dim, mlp_hidden=None, **options)
        gap = abs(count_parameters(config) - target)
        if best is None or gap < best[0]:
            best = (gap, config)
    assert best is not None
    return best[1]


def _memory_options(spec: ArchSpec, options: dict[str, Any]) -> dict[str, Any] | None:
    """The memory options that ``spec``'s memory config has (None: no memory)."""
    if spec.memory is None:
        return None
    fields = {f.name for f in dataclasses.fields(spec.memory)}
    return {name: value for name, value in options.items() if name in fields}


def _state_mb(state: object) -> float:
    return sum(t.numel() * t.element_size() for t in tensors(state)) / 2**20


@torch.no_grad()
def decode_latency(config: ModelConfig, context: int, steps: int, segment: int,
                   repeats: int, device: str = "cpu", autocast_mode: str = "off"
                   ) -> tuple[float, float, float, str, float]:
    """(seconds per token, state MB, largest state MB, note, first s) of greedy decoding after
    a ``context``-token prompt: the state's size after the prompt and the largest it reaches
    while decoding (a layer may hold more mid-chunk than at a chunk end; read in the untimed
    first run); the note flags non-finite logits; ``first s`` is the wall time of the prompt
    and the first decoding run, which includes any compiling."""
    torch.manual_seed(0)
    model = build_model(config).eval().to(device)
    ids = torch.randint(0, config.vocab_size, (1, context), device=device)
    finite: list[torch.Tensor] = []

    def read_prompt() -> tuple[torch.Tensor, Any]:
        state = None
        with autocast(device, autocast_mode):
            for start in range(0, context, segment):
                logits, state = model(ids[:, start:start + segment], state)
        finite.append(torch.isfinite(logits).all())
        return logits[:, -1:].argmax(-1), state

    read = token_reader(model)  # under --compile on: the whole forward as one graph

    sizes: list[float] = []

    def run(track: bool = False) -> None:
        token, carried = first, state
        with autocast(device, autocast_mode):
            for _ in range(steps):
                out, carried = read(token, carried)
                # kept on the device: a host read per token would stall a GPU's queue
                finite.append(torch.isfinite(out).all())
                token = out[:, -1:].argmax(-1)
                if track:
                    sizes.append(_state_mb(carried))

    prompt_s, (first, state) = timed_once(read_prompt, device)
    warmup_s, _ = timed_once(lambda: run(track=True), device)
    seconds = time_call(run, repeats=repeats, warmup=0, device=device) / steps
    note = "" if bool(torch.stack(finite).all()) else "non-finite outputs"
    state_mb = _state_mb(state)
    return seconds, state_mb, max([state_mb, *sizes]), note, prompt_s + warmup_s


def _graphs_compiled(mode: RunMode) -> int:
    """Graphs torch.compile has made in this process (0 for an eager cell: importing
    torch._dynamo costs time and memory it does not need)."""
    if not mode.compile:
        return 0
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _nothing_compiled(mode: RunMode, notes: list[str], graphs: int) -> None:
    if mode.compile and not _join(notes) and _graphs_compiled(mode) == graphs:
        notes.append("nothing compiled (no chunk step)")


def _failed(note: str) -> bool:
    return note.startswith("failed")


def _join(notes: list[str]) -> str:
    return "; ".join(note for note in notes if note)


def workload_in_mode(make: Callable[..., Callable[[], torch.Tensor]], mode: RunMode,
                     **kwargs: Any) -> Callable[[], torch.Tensor]:
    """``make``'s workload on ``mode``'s device and autocast, chunk steps compiled or not; a
    compiled one has run once already, so what is measured next excludes compiling (the
    peak-memory probe builds its workload here)."""
    set_compile(mode.compile, mode.backend)
    workload = make(device=mode.device, autocast_mode=mode.autocast, **_graph_kwargs(mode),
                    **kwargs)
    if mode.compile:
        workload()
    return workload


def _graph_kwargs(mode: RunMode) -> dict[str, bool]:
    """``cuda_graph=True`` for a graphed mode (only model workloads take it)."""
    return {"cuda_graph": True} if mode.cuda_graph else {}


def measure_cell(make: Callable[..., Callable[[], torch.Tensor]], kwargs: dict[str, Any],
                 mode: RunMode, repeats: int, memory: bool) -> dict[str, Any]:
    """One cell in this process: ``seconds`` (median of ``repeats`` after the first call and
    one warm-up call), ``first s`` (the first call alone, compiling included), ``note`` and,
    on CUDA with ``memory``, ``peak MB``."""
    notes: list[str] = []
    result: dict[str, Any] = {"seconds": math.nan, "first s": None, "peak MB": None,
                              "setup s": None}
    with _run_in_mode(mode, notes):
        build = functools.partial(make, device=mode.device, autocast_mode=mode.autocast,
                                  **_graph_kwargs(mode), **kwargs)
        if mode.cuda_graph:
            workload, result["setup s"], result["peak MB"] = _build_graphed(
                build, memory and mode.device == "cuda")
        else:
            workload = build()
        result["first s"], _ = timed_once(workload, mode.device)
        result["seconds"], note = measure(workload, repeats, device=mode.device)
        notes.insert(0, note)
        if memory and mode.device == "cuda" and not mode.cuda_graph and not _failed(note):
            result["peak MB"] = cuda_peak_mb(workload)
    result["note"] = _join(notes)
    return result


def _build_graphed(build: Callable[[], Callable[[], torch.Tensor]], cuda_memory: bool
                   ) -> tuple[Callable[[], torch.Tensor], float, float | None]:
    """``(workload, seconds, peak MiB)`` of building a graphed workload: its warm-up steps and
    capture (compiling included). A replay allocates nothing (the graph keeps its own pool),
    so the peak is taken here, above what was allocated before, the model's parameters
    included (``cuda_memory``; None without)."""
    if cuda_memory:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    workload = build()
    if cuda_memory:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda_memory else None
    return workload, seconds, peak


@contextlib.contextmanager
def _run_in_mode(mode: RunMode, notes: list[str]) -> Iterator[None]:
    """A cell's body with compiling switched as ``mode`` asks (and back off afterwards); a
    compile failure, a refused run or running out of memory ends the body and is noted first
    in ``notes``, and a compiled mode that compiled nothing says so."""
    set_compile(mode.compile, mode.backend)
    graphs = _graphs_compiled(mode)
    try:
        with compile_failures(notes):
            yield
    except (NestlearnError, NonFiniteError) as err:
        notes.insert(0, f"failed: {err}")
    except torch.OutOfMemoryError as err:
        notes.insert(0, f"failed: out of memory ({str(err).splitlines()[0]})")
    finally:
        set_compile(None)
    _nothing_compiled(mode, notes, graphs)


def _cell(args: argparse.Namespace, make: Callable[..., Callable[[], torch.Tensor]],
          kwargs: dict[str, Any], mode: RunMode, threads: int) -> dict[str, Any]:
    """``measure_cell`` in a fresh process when compiled or when --compile or --chunk-size
    has several values (so every side is measured alike), then the CPU peak-memory probe."""
    memory = not args.no_memory
    try:
        graph_sides = make is make_model_workload and len(args.cuda_graph) > 1
        if (mode.compile or len(args.compile) > 1 or mode.cuda_graph or graph_sides
                or len(args.chunk_size) > 1):
            result = in_fresh_process(measure_cell, make, kwargs, mode, args.repeats, memory,
                                      threads=threads)
        else:
            result = measure_cell(make, kwargs, mode, args.repeats, memory)
    except RuntimeError as err:  # the measuring process raised or died: report, go on
        last = str(err).strip().splitlines()[-1]
        result = {"seconds": math.nan, "first s": None, "peak MB": None, "setup s": None,
                  "note": f"failed: {last}"}
    if memory and mode.device == "cpu" and not _failed(result["note"]):
        result["peak MB"] = peak_memory_mb(functools.partial(workload_in_mode, make, mode),
                                           threads=threads, **kwargs)
    return result


def measure_decode(config: dict[str, Any], context: int, steps: int, segment: int,
                   repeats: int, mode: RunMode) -> dict[str, Any]:
    """One decode cell in this process (``decode_latency`` in ``mode``)."""
    notes: list[str] = []
    result: dict[str, Any] = {"seconds": math.nan, "first s": None, "state MB": None,
                              "largest state MB": None}
    with _run_in_mode(mode, notes):
        seconds, state_mb, largest_mb, note, first = decode_latency(
            ModelConfig.from_dict(config), context, steps, segment, repeats, mode.device,
            mode.autocast)
        result.update({"seconds": seconds, "state MB": state_mb,
                       "largest state MB": largest_mb, "first s": first})
        notes.insert(0, note)
    result["note"] = _join(notes)
    return result


def _modes(args: argparse.Namespace, graphs: bool = False) -> list[RunMode]:
    """Every ``--compile`` value, and with ``graphs`` (the models section) every
    ``--cuda-graph`` value for each."""
    return [RunMode(args.device, args.autocast, value == "on", args.compile_backend,
                    graph == "on")
            for value in args.compile for graph in (args.cuda_graph if graphs else ["off"])]


def _mode_columns(mode: RunMode, result: dict[str, Any]) -> dict[str, Any]:
    # a graphed cell compiles during its warm-up steps, timed with its capture ("setup s")
    compile_s = result.get("setup s") if mode.cuda_graph else result["first s"]
    return {**mode.row(), "compile s": compile_s if mode.compile else None,
            "first call s": result["first s"]}


def compile_value(text: str) -> str:
    """A ``--compile`` value: ``off`` or ``on``."""
    value = text.strip().lower()
    if value not in COMPILE:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {', '.join(COMPILE)}")
    return value


def checkpoint_segment(text: str) -> int | None:
    """A ``--checkpoint-segment`` value: ``off`` (None) or tokens per segment (an int >= 1)."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: 'off' or an int >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS),
                        help=f"sections to run, from {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192],
                        help="sequence lengths T for layers and models (default: 512 2048 8192)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default: 1)")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS),
                        help=f"layers to run, from {', '.join(LAYERS)} (default: all)")
    parser.add_argument("--dim", type=int, default=256, help="layer width D (default: 256)")
    parser.add_argument("--heads", type=int, default=4, help="heads (default: 4)")
    parser.add_argument("--chunk-size", type=int, nargs="+", default=[64], metavar="C",
                        help="memory chunk size (every memory of an arch, HOPE's inner one "
                             "too unless --inner-chunk-size); several values run side by "
                             "side, each cell in a fresh process, e.g. '32 64 128'; layers "
                             "and archs without such a memory run once; "
                             f"{model_chunks_help()} (default: 64)")
    parser.add_argument("--inner-chunk-size", type=int, default=None, metavar="C",
                        help="chunk of HOPE's inner memories (k, v, eta, alpha) in the "
                             "layers, models and decode sections on its own "
                             "(default: each --chunk-size value)")
    parser.add_argument("--cms-chunk-sizes", type=int, nargs="+", default=[64, 512],
                        help="CMS level chunk sizes (default: 64 512)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS),
                        help=f"models to run, from {', '.join(ARCHS)} (default: all)")
    parser.add_argument("--model-dim", type=int, default=256,
                        help="width of the reference Transformer (default: 256)")
    parser.add_argument("--model-layers", type=int, default=4,
                        help="blocks of every model (default: 4)")
    parser.add_argument("--vocab-size", type=int, default=256, help="vocabulary (default: 256)")
    parser.add_argument("--checkpoint-segment", type=checkpoint_segment, nargs="+",
                        default=[None], metavar="N|off",
                        help="models: activation checkpointing over segments of N tokens; "
                             "several values run side by side, e.g. 'off 512' (default: off)")
    parser.add_argument("--window", type=int, default=512,
                        help="sliding window of titans-mag's attention (default: 512)")
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[512, 2048, 8192],
                        help="context lengths before decoding (default: 512 2048 8192)")
    parser.add_argument("--decode-steps", type=int, default=64,
                        help="tokens decoded per measurement (default: 64, one memory chunk)")
    parser.add_argument("--titans-dim", type=int, default=256,
                        help="width of the titans-pytorch comparison (default: 256)")
    parser.add_argument("--titans-length", type=int, default=1024,
                        help="T of the titans-pytorch comparison (default: 1024)")
    parser.add_argument("--titans-batch", type=int, default=2,
                        help="batch of the titans-pytorch comparison (default: 2)")
    parser.add_argument("--titans-malloc", nargs="+", choices=MALLOC_SETTINGS,
                        default=["default"],
                        help="glibc's allocator settings for both sides of the titans-pytorch "
                             "comparison: 'default', or 'tuned' (freed memory kept for reuse "
                             "instead of handed back to the kernel and faulted in again: "
                             f"{' '.join(f'{k}={v}' for k, v in TUNED_MALLOC.items())}); "
                             "several run side by side (default: default)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="layers, models, decode: where tensors and models live; cuda "
                             "timings synchronize around each timed call and peak MB is "
                             "torch.cuda.max_memory_allocated (default: cpu)")
    parser.add_argument("--autocast", choices=AUTOCAST, default="off",
                        help="layers, models, decode: bf16 runs the forward under "
                             "torch.autocast(device, bfloat16), on cpu as well as cuda "
                             "(default: off, float32)")
    parser.add_argument("--compile", type=compile_value, nargs="+", default=["off"],
                        metavar="off|on",
                        help="layers, models, decode and our titans-pytorch row: 'on' runs the "
                             "memories' steps under torch.compile (nestlearn.ops."
                             "set_compile; decode reads each token with the whole model "
                             "compiled); several values run side by side, e.g. 'off on', "
                             "each cell in a fresh process; the first call is timed apart as "
                             "'compile s', a failure to compile is named in the note "
                             "(default: off)")
    parser.add_argument("--cuda-graph", type=compile_value, nargs="+", default=["off"],
                        metavar="off|on",
                        help="models, with --device cuda: 'on' replays each forward+backward "
                             "from a CUDA graph (nestlearn.training.cuda_graph, as "
                             "train.cuda_graph does; captured before timing); several values "
                             "run side by side with every --compile value, each cell in a "
                             "fresh process (default: off)")
    parser.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                        help="torch.compile backend of --compile on: inductor generates fused "
                             "kernels, aot_eager only traces (seconds; checks the graph) "
                             "(default: inductor)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per cell, median reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's current setting)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory probes (each runs in a fresh process)")
    parser.add_argument("--out", default="results/bench",
                        help="folder for the JSON reports (default: results/bench)")


def _check_args(args: argparse.Namespace) -> None:
    for option, names, allowed in (("--sections", args.sections, SECTIONS),
                                   ("--layers", args.layers, LAYERS),
                                   ("--archs", args.archs, ARCHS)):
        for name in names:
            if name not in allowed:
                raise invalid(option, repr(name), f"names from {', '.join(allowed)}")
    for name in ("lengths", "batch", "dim", "heads", "chunk_size", "inner_chunk_size",
                 "cms_chunk_sizes", "model_dim", "model_layers", "vocab_size", "window",
                 "decode_contexts", "decode_steps", "titans_dim", "titans_length",
                 "titans_batch", "repeats", "threads"):
        value = getattr(args, name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item < 1:
                raise invalid(f"--{name.replace('_', '-')}", item, "integers >= 1")
    if "on" in args.cuda_graph and args.device != "cuda":
        raise invalid("--cuda-graph", f"'on' with --device {args.device}",
                      "'on' with --device cuda (CUDA graphs need a GPU), or 'off'")
    if "on" in args.cuda_graph and any(s is not None for s in args.checkpoint_segment):
        segments = " ".join("off" if s is None else str(s) for s in args.checkpoint_segment)
        raise invalid("--cuda-graph", f"'on' with --checkpoint-segment {segments}",
                      "'on' with --checkpoint-segment off (activation checkpointing reads "
                      "the CUDA RNG state, which a capture refuses)")
    if "on" in args.cuda_graph and "models" not in args.sections:
        raise invalid("--cuda-graph", f"'on' with --sections {' '.join(args.sections)}",
                      "'on' with the models section, the one it applies to")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise invalid("--device", "'cuda'", "cpu (torch.cuda.is_available() is false here: "
                                            "no CUDA device or a CPU-only torch)")
    if "tuned" in args.titans_malloc and "titans-pytorch" not in args.sections:
        raise invalid("--titans-malloc", "tuned with --sections " + " ".join(args.sections),
                      "tuned with the titans-pytorch section, the one it applies to")
    if "tuned" in args.titans_malloc and platform.libc_ver()[0] != "glibc":
        raise invalid("--titans-malloc", "tuned", "default here (the settings are glibc's; "
                      f"this Python runs on {platform.libc_ver()[0] or 'another C library'})")
    if len(set(args.titans_malloc)) < len(args.titans_malloc):
        raise invalid("--titans-malloc", " ".join(args.titans_malloc),
                      "distinct values (each runs side by side with the others)")
    if len(set(args.chunk_size)) < len(args.chunk_size):
        raise invalid("--chunk-size", " ".join(map(str, args.chunk_size)),
                      "distinct values (each runs side by side with the others)")
    # Validates dims, heads and chunk sizes once, with the config's own messages.
    for chunk in args.chunk_size:
        _layer_configs(args.dim, args.heads, chunk, args.cms_chunk_sizes,
                       args.inner_chunk_size)
    _base_config(args)


def _base_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(arch="transformer", vocab_size=args.vocab_size, dim=args.model_dim,
                       layers=args.model_layers, heads=args.heads)


def _sections(args: argparse.Namespace, chunk: int) -> dict[str, Any]:
    """The memory and CMS options of the compared models (every memory chunk ``chunk``,
    HOPE's inner chunk ``--inner-chunk-size`` if given)."""
    return {"memory": {"chunk_size": chunk, "inner_chunk_size": _inner_size(args, chunk)},
            "cms": {"chunk_sizes": tuple(args.cms_chunk_sizes)}}


def _inner_size(args: argparse.Namespace, chunk: int) -> int:
    """HOPE's inner chunk at the memory chunk ``chunk``."""
    return args.inner_chunk_size or chunk


def _chunks(args: argparse.Namespace, chunked: bool) -> list[tuple[int | str, int]]:
    """``(shown, size)`` for every ``--chunk-size`` of a layer or arch with a chunked memory;
    else its one run, ``(NO_CHUNK, the first size)`` (no memory reads the size)."""
    if chunked:
        return [(size, size) for size in args.chunk_size]
    return [(NO_CHUNK, args.chunk_size[0])]


def _layer_rows(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    rows = []
    for layer in args.layers:
        chunks = _chunks(args, layer in CHUNKED_LAYERS)
        with torch.device("meta"):  # the chunk size changes no parameter: counted once
            config = _layer_configs(args.dim, args.heads, chunks[0][1], args.cms_chunk_sizes,
                                    args.inner_chunk_size)
            params = sum(p.numel() for p in build_layer(layer, config).parameters())
        for length, (chunk, size), mode in itertools.product(args.lengths, chunks,
                                                             _modes(args)):
            kwargs = {"layer": layer, "dim": args.dim, "heads": args.heads,
                      "chunk_size": size, "cms_chunk_sizes": args.cms_chunk_sizes,
                      "length": length, "batch": args.batch,
                      "inner_chunk_size": args.inner_chunk_size}
            progress(f"layer {layer} T={length} chunk {chunk} {_mode_text(mode)}")
            result = _cell(args, make_layer_workload, kwargs, mode, threads)
            rows.append({"layer": layer, "T": length, "B": args.batch, "D": args.dim,
                         "chunk": chunk,
                         "inner chunk": (_inner_size(args, size)
                                         if layer in INNER_CHUNKED_LAYERS else NO_CHUNK),
                         "params": params, **_mode_columns(mode, result),
                         "tok/s": args.batch * length / result["seconds"],
                         "peak MB": result["peak MB"], "note": result["note"],
                         "threads": threads})
            write_json("layers", rows, args.out)
    return rows


def _mode_text(mode: RunMode) -> str:
    graph = ", cuda graph on" if mode.cuda_graph else ""
    return (f"on {mode.device}, autocast {mode.autocast}, "
            f"compile {'on' if mode.compile else 'off'}{graph}")


def _model_configs(args: argparse.Namespace) -> dict[tuple[str, int | str], ModelConfig]:
    """``{(arch, chunk): config}``: every ``--chunk-size`` of an arch with a memory, in the
    order of ``--archs``; an arch without one once, as ``(arch, NO_CHUNK)``."""
    base = _base_config(args)
    configs = {}
    for arch in args.archs:
        for chunk, size in _chunks(args, ARCHS[arch].memory is not None):
            configs[arch, chunk] = (base if arch == "transformer" else
                                    matched_config(arch, base, args.window,
                                                   _sections(args, size)))
    return configs


def _inner_column(config: ModelConfig) -> int | str:
    """The ``inner chunk`` column of an arch's rows (``-`` without HOPE's inner memories)."""
    return getattr(config.memory, "inner_chunk_size", NO_CHUNK)


def _model_rows(args: argparse.Namespace, configs: dict[tuple[str, int | str], ModelConfig],
                threads: int) -> list[dict[str, Any]]:
    rows = []
    for (arch, chunk), config in configs.items():
        params = count_parameters(config)
        for length, segment, mode in itertools.product(args.lengths, args.checkpoint_segment,
                                                       _modes(args, graphs=True)):
            shown = "off" if segment is None else segment
            progress(f"model {arch} T={length} B={args.batch} chunk {chunk} checkpoint "
                     f"segment {shown} {_mode_text(mode)}")
            run_config = dataclasses.replace(config, checkpoint_segment=segment)
            kwargs = {"config": run_config.to_dict(), "length": length, "batch": args.batch}
            result = _cell(args, make_model_workload, kwargs, mode, threads)
            rows.append({"arch": arch, "dim": config.dim, "layers": config.layers,
                         "params": params, "T": length, "B": args.batch, "chunk": chunk,
                         "inner chunk": _inner_column(config),
                         "checkpoint segment": shown, **_mode_columns(mode, result),
                         "cuda graph": "on" if mode.cuda_graph else "off",
                         "setup s": result.get("setup s"),
                         "tok/s": args.batch * length / result["seconds"],
                         "peak MB": result["peak MB"], "note": result["note"],
                         "threads": threads})
            write_json("layers-models", rows, args.out)
    return rows


def _decode_rows(args: argparse.Namespace, configs: dict[tuple[str, int | str], ModelConfig],
                 threads: int) -> list[dict[str, Any]]:
    rows = []
    for (arch, chunk), config in configs.items():
        # the context is read in segments of 512 tokens, or of one chunk if longer
        segment = 512 if chunk == NO_CHUNK else max(chunk, 512)
        for context, mode in itertools.product(args.decode_contexts, _modes(args)):
            progress(f"decode {arch} context={context} chunk {chunk} {_mode_text(mode)}")
            cell = (config.to_dict(), context, args.decode_steps, segment, args.repeats, mode)
            try:
                if mode.compile or len(args.compile) > 1 or len(args.chunk_size) > 1:
                    result = in_fresh_process(measure_decode, *cell, threads=threads)
                else:
                    result = measure_decode(*cell)
            except RuntimeError as err:  # the measuring process raised or died
                result = {"seconds": math.nan, "first s": None, "state MB": None,
                          "largest state MB": None,
                          "note": f"failed: {str(err).strip().splitlines()[-1]}"}
            rows.append({"arch": arch, "dim": config.dim, "context": context, "chunk": chunk,
                         "inner chunk": _inner_column(config),
                         **_mode_columns(mode, result),
                         "ms/token": 1000 * result["seconds"], "state MB": result["state MB"],
                         "largest state MB": result["largest state MB"],
                         "note": result["note"], "steps": args.decode_steps,
                         "threads": threads})
            write_json("layers-decode", rows, args.out)
    return rows


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    if "layers" in args.sections:
        write_report("layers", _layer_rows(args, threads), LAYER_COLUMNS, args.out)
    if "models" in args.sections or "decode" in args.sections:
        configs = _model_configs(args)
        if "models" in args.sections:
            write_report("layers-models", _model_rows(args, configs, threads), MODEL_COLUMNS,
                         args.out)
        if "decode" in args.sections:
            write_report("layers-decode", _decode_rows(args, configs, threads),
                         DECODE_COLUMNS, args.out)
    if "titans-pytorch" in args.sections:
        if titans_pytorch_available():
            write_report("layers-titans-pytorch", titans_rows(args, threads),
                         TITANS_COLUMNS, args.out)
        else:
            print("titans-pytorch is not installed: skipped its comparison "
                  "(pip install titans-pytorch)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
