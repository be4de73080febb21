"""Continuum Memory System: in-context level updates, exact against token-by-token references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.errors import NestlearnError
from nestlearn.nn import cms as cms_module
from nestlearn.nn.cms import (
    CMSConfig,
    ContinuumMemory,
    ContinuumMemoryState,
    settled,
)
from nestlearn.nn.teach_signal import find_cms_states, stream_with_teach_signal
from nestlearn.nn.transformer import RMSNorm, SwiGLU

DIM = 6
HIDDEN = 10
VARIANTS = ("sequential", "nested", "independent")
def make_layer(variant: str = "sequential", mlp: str = "swiglu", chunk_sizes=(2, 3, 6),
               inner_lr=(0.05, 0.03, 0.02), seed: int = 0, **kwargs) -> ContinuumMemory:
    torch.manual_seed(seed)
    # The fixed-rate rule these tests spell out: no step ceiling unless asked for (the ceiling
    # is tested in test_nn_cms_step_ceiling.py).
    kwargs = {"chunk_step": None, **kwargs}
    config = CMSConfig(dim=DIM, chunk_sizes=chunk_sizes, hidden=HIDDEN, mlp=mlp,
                       variant=variant, inner_lr=inner_lr, init_std=0.3, **kwargs)
    layer = ContinuumMemory(config).double()
    with torch.no_grad():
        for target in layer.local_targets.values():
            target.normal_(std=0.3)
        for norm in layer.norms:
            norm.weight.uniform_(0.5, 1.5)
        if variant == "independent":
            layer.mix.uniform_(0.3, 1.0)
    return layer


def random_input(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, DIM, generator=generator, dtype=torch.float64)


def assert_states_close(a: ContinuumMemoryState, b: ContinuumMemoryState) -> None:
    assert a.position == b.position
    for level_a, level_b in zip(a.levels, b.levels, strict=True):
        for wa, wb in zip(level_a.weights, level_b.weights, strict=True):
            torch.testing.assert_close(wa.expand_as(wb), wb.expand_as(wa), rtol=1e-10,
                                       atol=1e-12)
    # the unfinished chunks' gradient sums, however each state holds them (accumulated or
    # pending tokens)
    for level_a, level_b in zip(settled(a).levels, settled(b).levels, strict=True):
        assert (level_a.accumulator is None) == (level_b.accumulator is None)
        if level_a.accumulator is not None:
            for ga, gb in zip(level_a.accumulator, level_b.accumulator, strict=True):
                torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)


def param_grads(layer: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


@pytest.mark.parametrize(("chunk_sizes", "length"), [((1, 5), 3), ((1, 2), 7), ((4, 16), 3)])
def test_chunk_one_and_sequences_shorter_than_a_chunk(chunk_sizes, length):
    layer = make_layer("nested", "swiglu", chunk_sizes, (0.05, 0.02))
    x = random_input(length)
    y, state = layer(x)
    y_ref, state_ref = layer.forward_naive(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert_states_close(state, state_ref)


def per_token_level_grads(layer: ContinuumMemory, x_t: torch.Tensor,
                          weights: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Gradient at each level of the local objective for one token ``x_t [B, D]``, by autograd
    on an MLP written here (sequential chain, SwiGLU): the test's independent reference."""
    h = x_t
    grads = []
    for index, level_weights in enumerate(weights):
        with torch.enable_grad():
            loss, leaves, out = _level_loss(layer, index, h, level_weights)
            grads.append(list(torch.autograd.grad(loss, leaves)))
        h = h + out.detach()
    return grads


def _level_loss(layer: ContinuumMemory, index: int, h: torch.Tensor,
                level_weights: list[torch.Tensor]):
    """One token's local loss at one level, as a function of fresh leaf weights."""
    leaves = [w.detach().clone().requires_grad_() for w in level_weights]
    n = layer.norms[index](h).detach()
    w_gate, w_up, w_down = leaves
    hidden = F.silu(torch.einsum("boi,bi->bo", w_gate, n)) * torch.einsum("boi,bi->bo", w_up, n)
    out = torch.einsum("boi,bi->bo", w_down, hidden)
    target = n @ layer.local_targets[str(index)].detach().T
    return 0.5 * (out - target).pow(2).sum(), leaves, out


def test_levels_change_only_at_boundaries_by_their_accumulated_update():
    chunk_sizes = (2, 3, 6)
    rates = (0.05, 0.03, 0.02)
    layer = make_layer("sequential", "swiglu", chunk_sizes, rates)
    x = random_input(14)
    batch = x.shape[0]
    state = layer.init_state(batch)
    pending = [[torch.zeros(batch, *w.shape) for w in level.weights] for level in state.levels]
    pending = [[p.double() for p in level] for level in pending]
    changes = {0: [], 1: [], 2: []}
    with torch.no_grad():
        for t in range(x.shape[1]):
            current = [[w.expand(batch, *w.shape[-2:]) for w in level.weights]
                       for level in state.levels]
            token_grads = per_token_level_grads(layer, x[:, t], current)
            _, new_state = layer(x[:, t:t + 1], state)
            position = t + 1
            for index, size in enumerate(chunk_sizes):
                pending[index] = [p + g for p, g in zip(pending[index], token_grads[index],
                                                        strict=True)]
                old = current[index]
                new = [w.expand(batch, *w.shape[-2:]) for w in new_state.levels[index].weights]
                if position % size:
                    for w_old, w_new in zip(old, new, strict=True):
                        assert torch.equal(w_old, w_new)
                else:
                    changes[index].append(position)
                    for w_old, w_new, acc in zip(old, new, pending[index], strict=True):
                        assert not torch.allclose(w_old, w_new)
                        torch.testing.assert_close(w_new, w_old - rates[index] * acc,
                                                   rtol=1e-10, atol=1e-12)
                    pending[index] = [torch.zeros_like(p) for p in pending[index]]
            state = new_state
    assert changes == {0: [2, 4, 6, 8, 10, 12, 14], 1: [3, 6, 9, 12], 2: [6, 12]}


def test_a_chunk_takes_its_gradients_once_at_its_end(monkeypatch):
    # Token by token, a level holds its chunk's inputs and targets and takes their gradients
    # in one call when the chunk ends (the chunk's gradients are all taken at its starting
    # weights); the state says how many tokens it holds.
    chunk_sizes = (2, 3, 6)
    layer = make_layer("sequential", "swiglu", chunk_sizes)
    calls = []
    original = cms_module._level_piece_step

    def counted(config, index, weights, n, target, learns):
        calls.append((index, n.shape[1]))
        return original(config, index, weights, n, target, learns)

    monkeypatch.setattr(cms_module, "_level_piece_step", counted)
    x = random_input(12)
    state = layer.init_state(2)
    with torch.no_grad():
        for t in range(x.shape[1]):
            calls.clear()
            _, state = layer(x[:, t:t + 1], state)
            position = t + 1
            assert calls == [(index, size) for index, size in enumerate(chunk_sizes)
                             if position % size == 0]
            for size, level in zip(chunk_sizes, state.levels, strict=True):
                held = position % size
                assert level.accumulator is None
                if held:
                    assert [p.shape for p in level.pending] == [(2, held, DIM)] * 2
                else:
                    assert level.pending is None


def test_malformed_pending_tokens_are_refused():
    layer = make_layer()
    x = random_input(3)
    _, state = layer(x)  # position 3: the chunk-6 level holds 3 tokens
    level = state.levels[2]
    inputs, targets = level.pending
    for pending, match in [
            (inputs, "tuple"),
            ((inputs, targets[:, :2]), r"\[2, P, 6\]"),
            ((inputs[..., :4], targets[..., :4]), r"\[2, P, 6\]"),
            ((inputs[:1], targets[:1]), r"\[2, P, 6\]"),
            ((inputs[:, :0], targets[:, :0]), "P >= 1")]:
        bad = dataclasses.replace(state, levels=(*state.levels[:2], dataclasses.replace(
            level, pending=pending)))
        with pytest.raises(NestlearnError, match=r"state\.levels\[2\]\.pending.*" + match):
            layer(x, bad)


def test_a_state_holding_fewer_tokens_than_its_chunk_has_seen_runs_on():
    # A settled state (its tokens in the accumulator: the reference's form, or one written
    # back by nestlearn.continual) mid-chunk, then token by token: the same as one pass.
    layer = make_layer(chunk_step=1.0)
    x = random_input(12)
    y_ref, final_ref = layer(x)
    _, state = layer(x[:, :4])
    state = settled(state)
    assert all(level.pending is None for level in state.levels)
    outputs = []
    for t in range(4, 12):
        y, state = layer(x[:, t:t + 1], state)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, 1), y_ref[:, 4:], rtol=1e-10, atol=1e-12)
    assert_states_close(state, final_ref)


def test_held_tokens_do_not_keep_the_segment_alive():
    layer = make_layer()
    _, state = layer(random_input(10))  # the chunk-3 and chunk-6 levels hold 1 and 4 tokens
    for level in state.levels[1:]:
        for part in level.pending:
            assert part.untyped_storage().nbytes() == part.numel() * part.element_size()


def test_settled_hands_back_a_state_that_holds_nothing():
    layer = make_layer()
    _, state = layer(random_input(6))
    assert settled(state) is state


@pytest.mark.parametrize("variant", ["sequential", "independent"])
def test_the_reference_continues_from_a_state_holding_tokens(variant):
    layer = make_layer(variant, chunk_step=1.0)
    x = random_input(11)
    _, state = layer(x[:, :4])  # the chunk-3 and chunk-6 levels hold tokens
    assert state.levels[1].pending is not None and state.levels[2].pending is not None
    y, final = layer(x[:, 4:], state)
    y_ref, final_ref = layer.forward_naive(x[:, 4:], state)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert_states_close(final, final_ref)


def test_a_nested_state_holding_tokens_is_refused():
    sequential, nested = make_layer("sequential"), make_layer("nested")
    x = random_input(3)
    _, held = sequential(x)
    _, state = nested(x)
    bad = dataclasses.replace(state, levels=(state.levels[0], state.levels[1],
                                             dataclasses.replace(state.levels[2],
                                                                 pending=held.levels[2].pending)))
    with pytest.raises(NestlearnError, match=r"pending.*nested variant holds none"):
        nested(x, bad)


def test_zero_pending_tokens_add_nothing():
    # What a stream's row reset gives a level that holds tokens (training.carried_state): zeros,
    # whose gradients are exactly zero (the MLP has no bias), so the row's next chunk end
    # updates as if it had held nothing.
    layer = make_layer(chunk_step=1.0)
    x = random_input(9)
    _, state = layer(x[:, :3])
    assert all(level.pending is not None for level in (state.levels[0], state.levels[2]))
    zeros = tuple(level if level.pending is None else dataclasses.replace(
        level, pending=tuple(torch.zeros_like(p) for p in level.pending))
        for level in state.levels)
    empty = tuple(dataclasses.replace(level, pending=None) for level in state.levels)
    y_zeros, after_zeros = layer(x[:, 3:], dataclasses.replace(state, levels=zeros))
    y_empty, after_empty = layer(x[:, 3:], dataclasses.replace(state, levels=empty))
    torch.testing.assert_close(y_zeros, y_empty, rtol=1e-12, atol=1e-14)
    assert_states_close(after_zeros, after_empty)
    assert not torch.equal(after_empty.levels[2].weights[0].expand_as(
        after_zeros.levels[2].weights[0]), state.levels[2].weights[0].expand_as(
        after_zeros.levels[2].weights[0]))


def test_nested_levels_restart_from_the_slower_level():
    layer = make_layer("nested", "swiglu", (2, 4), (0.05, 0.03))
    assert len(layer.initial) == 1
    x = random_input(9)
    state = layer.init_state(2)
    with torch.no_grad():
        for t in range(x.shape[1]):
            _, state = layer(x[:, t:t + 1], state)
            fast, slow = state.levels
            if (t + 1) % 4 == 0:
                for w_fast, w_slow in zip(fast.weights, slow.weights, strict=True):
                    assert torch.equal(w_fast, w_slow)
                assert fast.accumulator is None
            elif (t + 1) % 2 == 0:
                assert not torch.equal(fast.weights[0], slow.weights[0])


def plain_chain(layer: ContinuumMemory, x: torch.Tensor) -> torch.Tensor:
    """Frozen CMS written as Transformer++ modules: ``h + SwiGLU(RMSNorm(h))`` per level."""
    h = x
    for index in range(layer.config.num_levels):
        mlp = SwiGLU(DIM, HIDDEN).double()
        norm = RMSNorm(DIM, layer.config.norm_eps).double()
        w_gate, w_up, w_down = layer.initial_weights(index)
        with torch.no_grad():
            mlp.gate.weight.copy_(w_gate)
            mlp.up.weight.copy_(w_up)
            mlp.down.weight.copy_(w_down)
            norm.weight.copy_(layer.norms[index].weight)
        h = h + mlp(norm(h))
    return h


@pytest.mark.parametrize("mode", ["frozen", "zero_rates"])
def test_frozen_mode_is_a_plain_mlp_chain(mode):
    if mode == "frozen":
        layer = make_layer(frozen=True)
        assert len(layer.local_targets) == 0
    else:
        layer = make_layer(inner_lr=0.0)
    x = random_input(13)
    y, state = layer(x)
    assert state.position == 13
    torch.testing.assert_close(y, plain_chain(layer, x), rtol=0, atol=1e-14)
    for level, index in zip(state.levels, range(3), strict=True):
        for w, param in zip(level.weights, layer.initial_weights(index), strict=True):
            assert torch.equal(w, param)


def test_frozen_independent_is_a_weighted_sum_of_mlps():
    layer = make_layer("independent", "gelu", frozen=True)
    x = random_input(5)
    y, _ = layer(x)
    expected = x.clone()
    for index in range(3):
        w_in, w_out = layer.initial_weights(index)
        n = layer.norms[index](x)
        expected = expected + layer.mix[index] * (F.gelu(n @ w_in.T) @ w_out.T)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-14)


def test_load_level_from_swiglu_copies_a_transformer_mlp():
    layer = make_layer(frozen=True, chunk_sizes=(4,), inner_lr=0.0)
    torch.manual_seed(5)
    mlp = SwiGLU(DIM, HIDDEN).double()
    norm = RMSNorm(DIM, 1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    layer.load_level_from_swiglu(0, mlp.gate.weight, mlp.up.weight, mlp.down.weight,
                                 norm.weight)
    x = random_input(7)
    y, _ = layer(x)
    torch.testing.assert_close(y, x + mlp(norm(x)), rtol=0, atol=1e-14)
    with pytest.raises(NestlearnError, match=r"w_gate\.shape"):
        layer.load_level_from_swiglu(0, mlp.gate.weight.T, mlp.up.weight, mlp.down.weight)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_meta_learned_initial_weights_and_targets(variant):
    layer = make_layer(variant)
    x = random_input(12)
    y, _ = layer(x)
    # Only outputs after the first update of the fastest level: the local targets act on them
    # solely through in-context updates.
    loss = y[:, 2:].pow(2).sum()
    loss.backward()
    for owner in layer.initial:
        for param in owner.weights():
            assert param.grad is not None and param.grad.abs().sum() > 0
    for target in layer.local_targets.values():
        assert target.grad is not None and target.grad.abs().sum() > 0


def test_gradcheck_through_in_context_updates():
    layer = make_layer("sequential", "gelu", chunk_sizes=(2, 3), inner_lr=(0.2, 0.1))
    x = random_input(7, batch=1)

    def run(target: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
        overrides = {"local_targets.0": target, "initial.1.w_in": w_in}
        return torch.func.functional_call(layer, overrides, (x,))[0]

    inputs = (layer.local_targets["0"].detach().clone().requires_grad_(),
              layer.initial[1].w_in.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(run, inputs)


def test_state_from_another_config_is_refused():
    layer = make_layer()
    other = make_layer(chunk_sizes=(2, 4, 6))
    x = random_input(3)
    _, state = other(x)
    with pytest.raises(NestlearnError, match=r"state\.config"):
        layer(x, state)
    _, state = layer(x)
    with pytest.raises(NestlearnError, match=r"state\.batch_size"):
        layer(random_input(3, batch=3), state)
    with pytest.raises(NestlearnError, match="ContinuumMemoryState"):
        layer(x, (torch.zeros(1),))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"chunk_sizes": (4, 2)}, "chunk_sizes"),
    ({"chunk_sizes": (2, 2)}, "chunk_sizes"),
    ({"chunk_sizes": ()}, "chunk_sizes"),
    ({"chunk_sizes": (0, 2)}, "chunk_sizes"),
    ({"chunk_sizes": (1.5,)}, "chunk_sizes"),
    ({"mlp": "relu"}, "mlp"),
    ({"variant": "parallel"}, "variant"),
    ({"teach_signal": "reconstruction"}, "teach_signal"),
    ({"inner_lr": -0.1}, "inner_lr"),
    ({"inner_lr": (0.1, 0.2)}, "inner_lr"),
    ({"inner_lr": float("nan")}, "inner_lr"),
    ({"hidden": 0}, "hidden"),
    ({"hidden": (4, 8, 8), "variant": "nested"}, "hidden"),
    ({"dim": 0}, "dim"),
    ({"frozen": 1}, "frozen"),
    ({"norm_eps": 0.0}, "norm_eps"),
])
def test_bad_config_names_the_field(kwargs, field):
    arguments = {"dim": DIM, "chunk_sizes": (2, 3, 6), **kwargs}
    with pytest.raises(NestlearnError, match=f"^{field}"):
        CMSConfig(**arguments)


def test_config_normalizes_scalars_and_lists():
    config = CMSConfig(dim=4, chunk_sizes=[2, 8], hidden=16, inner_lr=0.5)
    assert config.chunk_sizes == (2, 8)
    assert config.hidden == 16 and config.level_hidden == (16, 16)
    assert config.inner_lr == 0.5 and config.level_inner_lr == (0.5, 0.5)  # one shared rate
    assert config == CMSConfig(dim=4, chunk_sizes=(2, 8), hidden=16, inner_lr=(0.5, 0.5))
    # hidden keeps what was asked for (so a model's width can re-derive it); lists become tuples
    assert CMSConfig(dim=4, chunk_sizes=(2, 8), hidden=[16, 12]).hidden == (16, 12)


def test_bad_input_is_refused():
    layer = make_layer()
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        layer(torch.zeros(2, 0, DIM, dtype=torch.float64))
    with pytest.raises(NestlearnError, match=r"x\.shape"):
        layer(torch.zeros(2, 3, DIM + 1, dtype=torch.float64))
    with pytest.raises(NestlearnError, match=r"x\.dtype"):
        layer(torch.zeros(2, 3, DIM))


class TinyLM(nn.Module):
    """Embedding, a CMS with the LM teach signal, a linear head (no token mixing)."""

    def __init__(self, config: CMSConfig, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(vocab, config.dim)
        self.cms = ContinuumMemory(config)
        self.head = nn.Linear(config.dim, vocab, bias=False)

    def init_state(self, batch: int) -> dict:
        return {"cms": self.cms.init_state(batch)}

    def forward(self, ids: torch.Tensor, state: dict | None = None, *, teach_hook=None):
        h, cms = self.cms(self.embed(ids), None if state is None else state["cms"],
                          teach_hook=teach_hook)
        return self.head(h), {"cms": cms}


def lm_config(**kwargs) -> CMSConfig:
    arguments = {"dim": DIM, "chunk_sizes": (2, 4), "hidden": HIDDEN, "mlp": "swiglu",
                 "teach_signal": "lm", "inner_lr": (0.05, 0.02), "init_std": 0.3, **kwargs}
    return CMSConfig(**arguments)


def reference_teach_signal(model: TinyLM, ids: torch.Tensor, targets: torch.Tensor):
    """Token by token: the chain written out, each token's CE gradient w.r.t. each level's
    weights by autograd (detached: first order), summed over the chunk, applied at multiples
    of the chunk size. Returns per-token logits, final level weights and the per-level list
    of positions where weights changed."""
    config = model.cms.config
    batch = ids.shape[0]
    weights = [[w.expand(batch, *w.shape) for w in model.cms.initial_weights(i)]
               for i in range(config.num_levels)]
    pending = [None] * config.num_levels
    all_logits = []
    for t in range(ids.shape[1]):
        leaves = [[torch.zeros_like(w, requires_grad=True) for w in level] for level in weights]
        h = model.embed(ids[:, t])
        for index in range(config.num_levels):
            w_gate, w_up, w_down = (w + z for w, z in zip(weights[index], leaves[index],
                                                          strict=True))
            n = model.cms.norms[index](h)
            hidden = F.silu(torch.einsum("boi,bi->bo", w_gate, n)) * torch.einsum(
                "boi,bi->bo", w_up, n)
            h = h + torch.einsum("boi,bi->bo", w_down, hidden)
        logits = model.head(h)
        all_logits.append(logits)
        loss = F.cross_entropy(logits, targets[:, t], reduction="sum")
        flat = [z for level in leaves for z in level]
        grads = iter(torch.autograd.grad(loss, flat, retain_graph=True))
        for index in range(config.num_levels):
            grad = [next(grads) for _ in leaves[index]]
            pending[index] = grad if pending[index] is None else [
                p + g for p, g in zip(pending[index], grad, strict=True)]
            if (t + 1) % config.chunk_sizes[index] == 0:
                rate = config.inner_lr[index]
                weights[index] = [w - rate * p for w, p in zip(weights[index], pending[index],
                                                                strict=True)]
                pending[index] = None
    return torch.stack(all_logits, dim=1), weights


def lm_stream(length: int, batch: int = 2, vocab: int = 11, seed: int = 4):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, length + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def test_lm_teach_signal_matches_independent_gradient_sums():
    model = TinyLM(lm_config()).double()
    ids, targets = lm_stream(11)
    logits, state = stream_with_teach_signal(model, ids, targets)
    logits_ref, weights_ref = reference_teach_signal(model, ids, targets)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-10, atol=1e-12)
    cms = state["cms"]
    assert cms.position == 11
    for level, ref in zip(cms.levels, weights_ref, strict=True):
        for w, w_ref in zip(level.weights, ref, strict=True):
            torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    # First order: the outer gradient treats each update as a constant, like the reference.
    loss = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    loss_ref = F.cross_entropy(logits_ref.reshape(-1, 11), targets.reshape(-1))
    grads = param_grads(model, loss)
    grads_ref = param_grads(model, loss_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)
    assert all(p.abs().sum() > 0 for p in grads[1:4])


def test_lm_teach_signal_drives_the_reference_as_the_fast_path(monkeypatch):
    # The driver finds the states it attached by identity: the reference hands an LM-driven
    # state back as it came (HOPE blocks call it under use_naive)
    model = TinyLM(lm_config()).double()
    ids, targets = lm_stream(9)
    logits, state = stream_with_teach_signal(model, ids, targets)
    monkeypatch.setattr(model.cms, "forward", model.cms.forward_naive)
    logits_ref, state_ref = stream_with_teach_signal(model, ids, targets)
    torch.testing.assert_close(logits_ref, logits, rtol=1e-10, atol=1e-12)
    assert_states_close(state_ref["cms"], state["cms"])


def test_lm_teach_signal_changes_levels_only_at_boundaries():
    model = TinyLM(lm_config(chunk_sizes=(2, 3), inner_lr=(0.05, 0.02))).double()
    ids, targets = lm_stream(9)
    state = None
    changed = {0: [], 1: []}
    with torch.no_grad():
        for t in range(ids.shape[1]):
            old = None if state is None else state["cms"]
            _, state = stream_with_teach_signal(model, ids[:, t:t + 1], targets[:, t:t + 1],
                                                state)
            new = state["cms"]
            previous = [model.cms.initial_weights(i) for i in range(2)] if old is None else [
                level.weights for level in old.levels]
            for index in range(2):
                same = all(torch.equal(a.expand_as(b), b) for a, b in zip(
                    previous[index], new.levels[index].weights, strict=True))
                if not same:
                    changed[index].append(t + 1)
            assert not any(t.requires_grad for lv in new.levels for t in lv.weights)
    assert changed == {0: [2, 4, 6, 8], 1: [3, 6, 9]}


def test_lm_teach_signal_chained_calls_equal_one_call():
    model = TinyLM(lm_config(chunk_sizes=(2, 3), inner_lr=(0.05, 0.02))).double()
    ids, targets = lm_stream(10)
    with torch.no_grad():
        logits, state = stream_with_teach_signal(model, ids, targets)
        parts, chained = [], None
        for start, stop in ((0, 3), (3, 4), (4, 9), (9, 10)):
            out, chained = stream_with_teach_signal(model, ids[:, start:stop],
                                                    targets[:, start:stop], chained)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=1), logits, rtol=1e-10, atol=1e-12)
    for level, level_chain in zip(state["cms"].levels, chained["cms"].levels, strict=True):
        for w, w_chain in zip(level.weights, level_chain.weights, strict=True):
            torch.testing.assert_close(w_chain, w, rtol=1e-10, atol=1e-12)


def test_lm_teach_signal_nested_variant_restarts_fast_level():
    model = TinyLM(lm_config(variant="nested")).double()
    ids, targets = lm_stream(8)
    with torch.no_grad():
        logits, state = stream_with_teach_signal(model, ids, targets)
        parts, chained = [], None
        for start, stop in ((0, 1), (1, 6), (6, 8)):
            out, chained = stream_with_teach_signal(model, ids[:, start:stop],
                                                    targets[:, start:stop], chained)
            parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=1), logits, rtol=1e-10, atol=1e-12)
    fast, slow = state["cms"].levels
    for w_fast, w_slow in zip(fast.weights, slow.weights, strict=True):
        assert torch.equal(w_fast, w_slow)
    assert not torch.equal(slow.weights[0].expand_as(fast.weights[0]),
                           model.cms.initial_weights(1)[0].expand_as(fast.weights[0]))


def test_lm_mode_forward_alone_keeps_weights():
    model = TinyLM(lm_config()).double()
    ids, _ = lm_stream(9)
    _, state = model(ids, model.init_state(2))
    for index, level in enumerate(state["cms"].levels):
        for w, param in zip(level.weights, model.cms.initial_weights(index), strict=True):
            assert torch.equal(w, param)


def test_teach_signal_driver_refuses_bad_states():
    ids, targets = lm_stream(4)
    local_model = TinyLM(lm_config(teach_signal="local")).double()
    with pytest.raises(NestlearnError, match="teach_signal"):
        stream_with_teach_signal(local_model, ids, targets)
    model = TinyLM(lm_config()).double()
    _, moved = model(ids[:, :1], model.init_state(2))
    with pytest.raises(NestlearnError, match="positions"):
        stream_with_teach_signal(model, ids, targets,
                                 state={"cms": moved["cms"], "other": model.init_state(2)})
    with pytest.raises(NestlearnError, match="did not advance"):
        stream_with_teach_signal(lambda i, s, **hook: (model(i, s, **hook)[0],
                                                       {"cms": s["cms"]}), ids,
                                 targets, model.init_state(2))
    with pytest.raises(NestlearnError, match="targets"):
        stream_with_teach_signal(model, ids, targets[:, :2])
    with pytest.raises(NestlearnError, match="segment_len"):
        stream_with_teach_signal(model, ids, targets, segment_len=0)
    assert len(find_cms_states(model.init_state(2))) == 1


def test_one_inner_rate_lets_set_change_the_number_of_levels():
    from nestlearn.tasks.models import task_model_configs

    config = task_model_configs(["hope"], 32, ["cms.chunk_sizes=16,64,256"])["hope"].cms
    assert config.chunk_sizes == (16, 64, 256) and config.level_inner_lr == (1e-3,) * 3
    config = task_model_configs(["hope"], 32, ["cms.chunk_sizes=[16]"])["hope"].cms
    assert config.num_levels == 1 and config.level_inner_lr == (1e-3,)
    per_level = CMSConfig(dim=8, chunk_sizes=(2, 4), inner_lr=[0.1, 0.2])
    assert per_level.inner_lr == (0.1, 0.2) and per_level.level_inner_lr == (0.1, 0.2)
    # a run config saved when every rate was stored per level still equals today's
    assert CMSConfig(dim=8, chunk_sizes=(2, 4), inner_lr=(1e-3, 1e-3)) == \
        CMSConfig(dim=8, chunk_sizes=(2, 4))


@pytest.mark.parametrize("variant", ["sequential", "independent"])
@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("lengths", [(13,), (1, 5, 7), (6, 6)])
def test_level_by_level_equals_every_boundary_pieces(variant, mlp, lengths, monkeypatch):
    # The sequential and independent variants run one level at a time, each cut only at its
    # own boundaries; cutting every level at every boundary (the nested variant's path) gives
    # the same outputs, states and gradients in float64, the step ceiling included.
    layer = make_layer(variant, mlp, chunk_step=1.0)
    reference = make_layer(variant, mlp, chunk_step=1.0)
    monkeypatch.setattr(reference, "_run_levels", reference._run_pieces)
    calls = []
    monkeypatch.setattr(layer, "_run_pieces", lambda *args: calls.append(args))

    def run(module):
        x = random_input(sum(lengths)).requires_grad_()
        outputs, state, start = [], None, 0
        for size in lengths:
            y, state = module(x[:, start:start + size], state)
            outputs.append(y)
            start += size
        y = torch.cat(outputs, 1)
        return y, state, torch.autograd.grad(y.pow(2).sum(), [x, *module.parameters()])

    y, state, grads = run(layer)
    y_ref, state_ref, grads_ref = run(reference)
    assert not calls
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert_states_close(state, state_ref)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
