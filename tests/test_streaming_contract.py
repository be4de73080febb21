"""The streaming contract, checked once for every streaming layer and every model arch.

Every streaming module runs ``forward(x, state=None) -> (y, state)``. In float64:

(a) a stream cut into segments (cuts on and inside chunks) equals one pass, in outputs and in
    every tensor of the final state;
(b) the chunkwise path equals its token-by-token reference (``use_naive`` / ``forward_naive``)
    in outputs, final state and gradients w.r.t. the input and every parameter;
(c) gradients flow through a passed state: the loss of a second segment reaches every tensor
    of the state it starts from, the first segment's input, and the meta-learned initial
    memories (and none of them once the state is detached);
(d) a state saved with safetensors and loaded back continues the stream exactly.

States are walked generically (dataclasses, tuples, lists, dicts), never by field name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model_cases import (
    ARCHS_WIRED,
    INITIAL_STATE_MARKERS,
    random_ids,
    tiny_config,
    tiny_model,
)
from nestlearn.nn import (
    CausalDepthwiseConv,
    CausalSelfAttention,
    CMSConfig,
    ContinuumMemory,
    HOPEAttentionBlock,
    HOPEBlock,
    NeuralMemory,
    NeuralMemoryConfig,
    SelfModifyingTitans,
    SelfModifyingTitansConfig,
    TransformerBlock,
)
from nestlearn.nn.cms import ContinuumMemoryState, settled
from nestlearn.state import map_instances
from nestlearn.treeio import flatten, unflatten

DIM, HEADS, BATCH = 8, 2, 2
RTOL, ATOL = 1e-10, 1e-12
GRAD_RTOL, GRAD_ATOL = 1e-9, 1e-11

Forward = Callable[[Any, Any], tuple[torch.Tensor, Any]]


# --- generic state walking ----------------------------------------------------------------------

def leaves(tree: Any, path: str = "state") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` for every tensor and plain value inside a nested state."""
    if isinstance(tree, torch.Tensor) or tree is None or isinstance(tree, (bool, int, float, str)):
        yield path, tree
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for field in dataclasses.fields(tree):
            yield from leaves(getattr(tree, field.name), f"{path}.{field.name}")
    elif isinstance(tree, (list, tuple)):
        for index, item in enumerate(tree):
            yield from leaves(item, f"{path}[{index}]")
    elif isinstance(tree, dict):
        for key, item in tree.items():
            yield from leaves(item, f"{path}[{key!r}]")
    else:
        raise TypeError(f"{path}: unexpected {type(tree).__name__} in a state")


def tensors_of(state: Any) -> list[torch.Tensor]:
    return [leaf for _, leaf in leaves(state) if isinstance(leaf, torch.Tensor)]


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``tree`` rebuilt with ``fn`` applied to every tensor, in ``leaves`` order."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: map_tensors(getattr(tree, f.name), fn)
                                            for f in dataclasses.fields(tree) if f.init})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tensors(item, fn) for item in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(item, fn) for item in tree)
    if isinstance(tree, dict):
        return {key: map_tensors(item, fn) for key, item in tree.items()}
    return tree


def assert_states_close(got: Any, want: Any) -> None:
    """Same structure, same plain values, same tensors (a weight shared by the batch,
    ``[H, out, in]``, equals its per-element copies ``[B, H, out, in]``)."""
    got_leaves, want_leaves = list(leaves(got)), list(leaves(want))
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
            assert a.dtype == b.dtype, path
            a, b = torch.broadcast_tensors(a, b)
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=path)
        else:
            assert a == b, f"{path}: {a!r} != {b!r}"


def probe_loss(y: torch.Tensor, state: Any) -> torch.Tensor:
    """Depends on every output and every floating tensor of the final state (a CMS level's
    unfinished chunk as its gradient sum so far, however the state holds it)."""
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    loss = (y * weights).sum()
    for tensor in tensors_of(map_instances(settled, state, ContinuumMemoryState)):
        if tensor.is_floating_point():
            loss = loss + tensor.square().sum() / (1 + tensor.numel())
    return loss


def save_and_load(state: Any, directory) -> Any:
    """Through disk: the state's tensors as safetensors, the tree as JSON, rebuilt in order."""
    skeleton, stored = flatten(tensors_of(state), "state/")
    save_file(stored, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(skeleton))
    loaded = unflatten(json.loads((directory / "state.json").read_text()),
                       load_file(str(directory / "state.safetensors")))
    replacement = iter(loaded)
    rebuilt = map_tensors(state, lambda _: next(replacement))
    assert next(replacement, None) is None
    return rebuilt


# --- cases ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """A streaming module and how to feed it.

    ``chunk``: its (largest) chunk size, which sets where the cuts fall; ``naive``: its
    token-by-token reference as a forward function, if it has one.
    """

    make: Callable[[], nn.Module]
    chunk: int
    tokens: bool = False
    naive: Callable[[nn.Module], Forward] | None = None

    def inputs(self, length: int, seed: int = 1) -> torch.Tensor:
        if self.tokens:
            return random_ids(BATCH, length, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(BATCH, length, DIM, generator=generator, dtype=torch.float64)


def seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().double()
    return make


def naive_twin(module: nn.Module) -> nn.Module:
    """The same module, with the same weights, built with ``use_naive=True``."""
    if isinstance(module, HOPEBlock):
        titans = dataclasses.replace(module.titans.config, use_naive=True)
        twin = HOPEBlock(titans, module.cms.config)
    else:
        twin = type(module)(dataclasses.replace(module.config, use_naive=True))
    twin = twin.double()
    twin.load_state_dict(module.state_dict())
    return twin


def method(name: str) -> Callable[[nn.Module], Forward]:
    return lambda module: getattr(module, name)


def neural_memory(**overrides) -> Case:
    options = {"dim": DIM, "heads": HEADS, "depth": 2, "expansion": 2, "chunk_size": 4,
               **overrides}
    return Case(seeded(lambda: NeuralMemory(NeuralMemoryConfig(**options))),
                options["chunk_size"], naive=naive_twin)


def self_modifying(**overrides) -> Case:
    options = {"dim": DIM, "heads": HEADS, "expansion": 2, "inner_expansion": 2,
               "chunk_size": 4, "inner_chunk_size": 3, **overrides}
    return Case(seeded(lambda: SelfModifyingTitans(SelfModifyingTitansConfig(**options))),
                max(options["chunk_size"], options["inner_chunk_size"]),
                naive=naive_twin)


def cms_config(**overrides) -> CMSConfig:
    options = {"dim": DIM, "chunk_sizes": (2, 5), "hidden": 12, "inner_lr": (0.05, 0.02),
               "init_std": 0.3, **overrides}
    return CMSConfig(**options)


def randomize_cms(cms: ContinuumMemory) -> None:
    """Nonzero local targets (the levels learn from their first chunk), norm gains away from
    1 and mixing weights away from 1/k, so no term of the update can hide behind a default."""
    with torch.no_grad():
        for target in cms.local_targets.values():
            target.normal_(std=0.3)
        for norm in cms.norms:
            norm.weight.uniform_(0.5, 1.5)
        if cms.config.variant == "independent":
            cms.mix.uniform_(0.3, 1.0)


def continuum_memory(variant: str, mlp: str) -> Case:
    def build() -> nn.Module:
        layer = ContinuumMemory(cms_config(variant=variant, mlp=mlp, teach_signal="local",
                                           chunk_sizes=(2, 3, 6), inner_lr=(0.05, 0.03, 0.02)))
        randomize_cms(layer)
        return layer
    return Case(seeded(build), 6, naive=method("forward_naive"))


def hope_attention_block() -> Case:
    def build() -> nn.Module:
        block = HOPEAttentionBlock(DIM, HEADS, cms_config(), init_std=0.3)
        randomize_cms(block.cms)
        return block
    return Case(seeded(build), 5)


def hope_block() -> Case:
    titans = SelfModifyingTitansConfig(dim=DIM, heads=HEADS, expansion=2, inner_expansion=2,
                                       chunk_size=4, inner_chunk_size=3)
    return Case(seeded(lambda: HOPEBlock(titans, cms_config())), 5,
                naive=naive_twin)


LAYERS = {
    "conv": Case(seeded(lambda: CausalDepthwiseConv(DIM, 4)), 4, naive=method("forward_naive")),
    "attention": Case(seeded(lambda: CausalSelfAttention(DIM, HEADS, init_std=0.3)), 4),
    "attention-window": Case(seeded(lambda: CausalSelfAttention(DIM, HEADS, window=3,
                                                                init_std=0.3)), 3),
    "transformer-block": Case(seeded(lambda: TransformerBlock(DIM, HEADS, 12, init_std=0.3)), 4),
    "transformer-block-window": Case(seeded(lambda: TransformerBlock(DIM, HEADS, 12, window=3,
                                                                     init_std=0.3)), 3),
    "neural-memory": neural_memory(),
    "neural-memory-plain": neural_memory(momentum=False, weight_decay=False, conv=False),
    "neural-memory-dot-persistent": neural_memory(objective="dot", activation="silu",
                                                  persistent_tokens=3, chunk_size=3),
    "neural-memory-dgd-deep": neural_memory(dgd=True, depth=3, persistent_tokens=2),
    "neural-memory-chunk-1": neural_memory(chunk_size=1, heads=1, activation="tanh"),
    "neural-memory-narrow-heads": neural_memory(head_dim=3, expansion=1),
    "self-modifying": self_modifying(),
    "self-modifying-plain": self_modifying(momentum=False, weight_decay=False, dgd=False,
                                           conv=False),
    "self-modifying-literal": self_modifying(input_projection=False, normalize_inputs=False,
                                             output_gate=False, activation="silu",
                                             inner_depth=3),
    "self-modifying-chunk-1": self_modifying(chunk_size=1, inner_chunk_size=1, heads=1),
    "self-modifying-uneven-chunks": self_modifying(chunk_size=3, inner_chunk_size=5, depth=3),
    "self-modifying-self-target": self_modifying(memory_target="self", chunk_size=3),
    "self-modifying-v-target": self_modifying(memory_target="v"),
    "self-modifying-adaptive-q": self_modifying(adaptive_q=True, input_projection=False),
    "self-modifying-fixed-k-v": self_modifying(adaptive_k=False, adaptive_v=False),
    "self-modifying-chunk-start-readout": self_modifying(readout="chunk_start", chunk_size=3),
    # equal chunks and shapes: whole chunks run with all memories stacked in one call
    "self-modifying-stacked": self_modifying(inner_chunk_size=4),
    "self-modifying-stacked-plain": self_modifying(inner_chunk_size=4, momentum=False,
                                                   weight_decay=False, dgd=False, conv=False),
    "self-modifying-stacked-v-target": self_modifying(inner_chunk_size=4, memory_target="v",
                                                      normalize_values=True),
    "self-modifying-stacked-adaptive-q": self_modifying(inner_chunk_size=4, adaptive_q=True,
                                                        input_projection=False),
    "self-modifying-stacked-fixed-k-v": self_modifying(inner_chunk_size=4, adaptive_k=False,
                                                       adaptive_v=False, activation="tanh"),
    "neural-memory-chunk-start-readout": neural_memory(readout="chunk_start",
                                                       persistent_tokens=2),
    **{f"cms-{variant}-{mlp}": continuum_memory(variant, mlp)
       for variant in ("sequential", "nested", "independent") for mlp in ("swiglu", "gelu")},
    "hope-block": hope_block(),
    "hope-attention-block": hope_attention_block(),
}

def largest_chunk(config) -> int:
    """The longest chunk of any memory in a model (1 without memories)."""
    chunks = [1]
    if config.memory is not None:
        chunks += [config.memory.chunk_size, getattr(config.memory, "inner_chunk_size", 1)]
    if config.cms is not None:
        chunks += list(config.cms.chunk_sizes)
    return max(chunks)


MODELS = {
    f"model-{arch}": Case(lambda arch=arch: tiny_model(arch), largest_chunk(tiny_config(arch)),
                          tokens=True)
    for arch in ARCHS_WIRED
}

CASES = {**LAYERS, **MODELS}
WITHOUT_INITIAL_MEMORIES = {"conv", "attention", "attention-window", "transformer-block",
                            "transformer-block-window", "model-transformer"}
NAIVE = {name: case for name, case in CASES.items() if case.naive is not None}


def segment_lengths(chunk: int) -> list[tuple[int, ...]]:
    """Cuts on and inside chunks: 1, 3, chunk - 1, chunk + 1 tokens, then whatever is left."""
    patterns = [(1, 3, chunk - 1, chunk + 1), (chunk + 1, 1, chunk - 1, 3)]
    return [tuple(n for n in lengths if n > 0) for lengths in patterns]


def run_segments(module: nn.Module, x: torch.Tensor, lengths: tuple[int, ...], state: Any = None
                 ) -> tuple[torch.Tensor, Any]:
    pieces, start = [], 0
    for stop in (*(sum(lengths[:i + 1]) for i in range(len(lengths))), x.shape[1]):
        out, state = module(x[:, start:stop], state)
        pieces.append(out)
        start = stop
    return torch.cat(pieces, dim=1), state


def initial_memories(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters()
            if any(marker in name for marker in INITIAL_STATE_MARKERS)}


# --- (a) segments equal one pass -----------------------------------------------------------------

def input_and_parameter_grads(module: nn.Module, forward: Forward, case: Case, length: int,
                              lengths: tuple[int, ...] | None = None
                              ) -> tuple[torch.Tensor, Any, tuple[torch.Tensor | None, ...]]:
    """Outputs, final state and the probe loss's gradients w.r.t. the input (float inputs
    only) and every parameter of ``module``, from one pass or from segments of ``lengths``."""
    x = case.inputs(length)
    if not case.tokens:
        x.requires_grad_()
    if lengths is None:
        y, state = forward(x, None)
    else:
        y, state = run_segments(forward, x, lengths)
    targets = [*([] if case.tokens else [x]), *module.parameters()]
    return y, state, torch.autograd.grad(probe_loss(y, state), targets, allow_unused=True)


def assert_grads_close(got: tuple, want: tuple, names: list[str]) -> None:
    for label, g, g_ref in zip(names, got, want, strict=True):
        assert (g is None) == (g_ref is None), label
        if g is not None:
            torch.testing.assert_close(g, g_ref, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=label)


def grad_names(module: nn.Module, case: Case) -> list[str]:
    return [*([] if case.tokens else ["input"]), *(n for n, _ in module.named_parameters())]


@pytest.mark.parametrize("name", sorted(CASES))
def test_segments_cut_anywhere_equal_one_pass(name):
    case = CASES[name]
    module = case.make()
    length = 2 * case.chunk + 7
    y, final, grads = input_and_parameter_grads(module, module, case, length)
    first, *others = segment_lengths(case.chunk)
    y_chained, chained, grads_chained = input_and_parameter_grads(module, module, case, length,
                                                                  first)
    torch.testing.assert_close(y_chained, y, rtol=RTOL, atol=ATOL)
    assert_states_close(chained, final)
    assert_grads_close(grads_chained, grads, grad_names(module, case))
    x = case.inputs(length)
    with torch.no_grad():
        for lengths in (*others, (1,) * (length - 1)):  # the last: token by token
            y_chained, chained = run_segments(module, x, lengths)
            torch.testing.assert_close(y_chained, y, rtol=RTOL, atol=ATOL)
            assert_states_close(chained, final)


# --- (b) chunkwise equals naive ------------------------------------------------------------------

@pytest.mark.parametrize("length", [2, None], ids=["shorter-than-a-chunk", "several-chunks"])
@pytest.mark.parametrize("name", sorted(NAIVE))
def test_chunkwise_equals_naive_outputs_state_and_gradients(name, length):
    case = NAIVE[name]
    module = case.make()
    naive = case.naive(module)
    naive_module = naive if isinstance(naive, nn.Module) else module
    length = 2 * case.chunk + 3 if length is None else length
    y, state, grads = input_and_parameter_grads(module, module, case, length)
    y_ref, state_ref, grads_ref = input_and_parameter_grads(naive_module, naive, case, length)
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    # a CMS level's unfinished chunk as the reference keeps it: its gradient sum so far
    assert_states_close(map_instances(settled, state, ContinuumMemoryState),
                        map_instances(settled, state_ref, ContinuumMemoryState))
    assert_grads_close(grads, grads_ref, grad_names(module, case))
    assert grads[0] is not None and grads[0].abs().max() > 0


# --- (c) gradients reach the initial state -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_reach_the_state_a_segment_starts_from(name):
    case = CASES[name]
    module = case.make()
    first_input = case.inputs(case.chunk + 2)
    second_input = case.inputs(case.chunk + 3, seed=2)
    if case.tokens:  # the first segment's embedded tokens stand for its input
        captured = []
        hook = module.backbone.embed.register_forward_hook(lambda _m, _i, out: captured.append(out))
        _, state = module(first_input)
        hook.remove()
        first = captured[0]
    else:
        first = first_input.requires_grad_()
        _, state = module(first)
    initial = initial_memories(module)
    assert bool(initial) == (name not in WITHOUT_INITIAL_MEMORIES), sorted(initial)

    # Every tensor of the passed state shapes the next segment's loss: the memory after the
    # pending tokens (".current") that of a one-token segment, the only kind that reads it
    # (longer ones replay the pending tokens from the chunk start; with the chunk-start
    # read-out it reaches the one-token segment's state, not its output), the rest a longer
    # one's.
    leaf_state = map_tensors(state, lambda t: t.detach().requires_grad_(t.is_floating_point()))
    state_leaves = [(path, t) for path, t in leaves(leaf_state)
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    for single in (False, True):
        read = [(path, t) for path, t in state_leaves if (".current" in path) == single]
        if not read:
            continue
        y, after = module(second_input[:, :1] if single else second_input, leaf_state)
        grads = torch.autograd.grad(probe_loss(y, after if single else None),
                                    [t for _, t in read], allow_unused=True)
        for (path, _), grad in zip(read, grads, strict=True):
            assert grad is not None and grad.abs().max() > 0, path

    # Through the state, the second segment's loss reaches the first segment's input and the
    # meta-learned initial memories; cut the state and it reaches neither.
    targets = [first, *initial.values()]
    for detach in (False, True):
        passed = map_tensors(state, torch.Tensor.detach) if detach else state
        y, _ = module(second_input, passed)
        grads = torch.autograd.grad(probe_loss(y, None), targets, retain_graph=True,
                                    allow_unused=True)
        labels = ["first input", *initial]
        for label, grad in zip(labels, grads, strict=True):
            reached = grad is not None and bool(grad.abs().max() > 0)
            assert reached != detach, (label, detach)


# --- (d) state round-trips through a checkpoint --------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_state_saved_and_loaded_continues_the_stream(name, tmp_path):
    case = CASES[name]
    module = case.make()
    x = case.inputs(2 * case.chunk + 3)
    cut = case.chunk + 2  # inside a chunk: pending tokens are part of the state
    with torch.no_grad():
        _, state = module(x[:, :cut])
        loaded = save_and_load(state, tmp_path)
        assert_states_close(loaded, state)
        y, final = module(x[:, cut:], state)
        y_loaded, final_loaded = module(x[:, cut:], loaded)
    torch.testing.assert_close(y_loaded, y, rtol=RTOL, atol=ATOL)
    assert_states_close(final_loaded, final)
