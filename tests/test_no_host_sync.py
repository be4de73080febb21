"""A training step's forward and backward read no tensor value on the host.

On a GPU every ``.item()``, ``bool(tensor)``, ``float(tensor)``, ``.tolist()`` ... waits for the
device to finish; inside a layer that runs per chunk it stalls the stream once per chunk. On CPU
nothing stalls, so these tests count the calls instead: every Tensor method that hands a value
to Python is wrapped while a tiny model of each architecture runs forward and backward: none
is allowed. Value checks (the token ids' range, the gates inside layers) run only under
``nestlearn.debug_checks``; those tests are below.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import nestlearn
from model_cases import ARCHS_WIRED, VOCAB, random_ids, tiny_model
from nestlearn.benchmarks.opcount import profiled_syncs
from nestlearn.errors import NestlearnError, NonFiniteError
from nestlearn.nn.titans import NeuralMemory, NeuralMemoryConfig
from nestlearn.ops import deep_memory, gated_delta_rule, init_deep_memory_weights
from nestlearn.ops.deep_memory import DeepMemoryState

# Tensor methods that copy a value to the host (a device sync on a GPU).
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__",
              "__index__", "nonzero")
BOUNDARY = "check_ids"  # the model's range check of its input ids, under the debug switch


class SyncCounter:
    """Counts host reads by the function that made them, while patched in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch, "nonzero", self._wrap("torch.nonzero", torch.nonzero))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code
            self.calls[f"{name} in {caller.co_name} ({caller.co_filename.rsplit('/', 1)[-1]})"] += 1
            return original(*args, **kwargs)

        return counted

    def outside(self, allowed: str) -> dict[str, int]:
        return {where: n for where, n in self.calls.items() if f" in {allowed} " not in where}

    def inside(self, allowed: str) -> int:
        return sum(n for where, n in self.calls.items() if f" in {allowed} " in where)


def forward_backward(model, ids, state=None):
    logits, state = model(ids, state)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return state


def run_two_steps(counter_patch, arch: str, segment: int | None, chunk: int | None = None
                  ) -> tuple[SyncCounter, Counter[str]]:
    """Forward and backward of a fresh stream and of one continued from a state that ends
    mid-chunk, counted: by the wrapped Tensor methods, and by the profiler, which also sees
    reads inside torch's C++ that the wrappers cannot (autograd formulas such as cumprod's
    backward, an ``.item()`` zero check)."""
    memory = {"memory": {"chunk_size": chunk, "inner_chunk_size": chunk}} if chunk else {}
    model = tiny_model(arch, dtype=torch.float32, checkpoint_segment=segment, **memory)
    ids = random_ids(2, 10)
    with torch.no_grad():
        _, state = model(ids[:, :5])
    counter = SyncCounter(counter_patch)
    reads = profiled_syncs(lambda: (forward_backward(model, ids),
                                    forward_backward(model, ids, state)))
    return counter, reads


@pytest.mark.parametrize(("arch", "segment", "chunk"),
                         [(arch, None, None) for arch in ARCHS_WIRED]
                         + [("hope-attention", 4, None), ("hope", None, 4)])
def test_forward_and_backward_do_not_sync(arch, segment, chunk, monkeypatch):
    # hope with one chunk size for every memory runs its stacked path
    with nestlearn.debug_checks(False):
        counter, reads = run_two_steps(monkeypatch, arch, segment, chunk)
    assert dict(counter.calls) == {}
    assert reads == {}


def test_debug_switch_reads_gates_inside_layers(monkeypatch):
    # what the test above would see from a layer that checked its gates per chunk
    with nestlearn.debug_checks():
        counter, _ = run_two_steps(monkeypatch, "titans", None)
    assert set(counter.outside(BOUNDARY)) == {"tolist in check_gate_values (_validate.py)"}
    assert counter.inside(BOUNDARY) == 2  # the ids' range, once per call


def test_ids_out_of_range_are_named_with_or_without_the_debug_switch():
    model = tiny_model("titans", dtype=torch.float32)
    ids = random_ids(1, 6)
    ids[0, 3] = VOCAB
    message = rf"^ids: got values in \[\d+, {VOCAB}\]; allowed: values in \[0, {VOCAB - 1}\]$"
    with nestlearn.debug_checks(), pytest.raises(NestlearnError, match=message):
        model(ids)
    # unchecked, the embedding lookup refuses it, and that error is reported the same way
    with pytest.raises(NestlearnError, match=message):
        model(ids)


def test_counter_sees_a_sync(monkeypatch):
    counter = SyncCounter(monkeypatch)
    x = torch.ones(3)
    x.sum().item()
    bool(x.any())
    assert sum(counter.calls.values()) == 2


def memory_and_gates(gate_value: float = 0.5):
    torch.manual_seed(0)
    layer = NeuralMemory(NeuralMemoryConfig(dim=8, heads=2, chunk_size=4))
    x = torch.randn(1, 6, 8)
    return layer, x, gate_value


def poison_gates(layer: NeuralMemory, monkeypatch, which: int, value: float) -> None:
    """Make one of the layer's gates (0 alpha, 1 eta) hold ``value`` at one token."""
    original = layer.gate_values

    def gates(x):
        values = list(original(x))
        bad = values[which].clone()
        bad[0, 2, 1] = value
        values[which] = bad
        return tuple(values)

    monkeypatch.setattr(layer, "gate_values", gates)


def test_layer_skips_value_checks_without_the_debug_switch(monkeypatch):
    layer, x, _ = memory_and_gates()
    poison_gates(layer, monkeypatch, 0, float("nan"))
    y, _ = layer(x)  # no check: the NaN flows into the output, for the trainer to see
    assert not torch.isfinite(y).all()


def test_debug_switch_catches_a_nan_gate(monkeypatch):
    layer, x, _ = memory_and_gates()
    poison_gates(layer, monkeypatch, 0, float("nan"))
    with nestlearn.debug_checks(), pytest.raises(
            NonFiniteError, match=r"^alpha: got non-finite values; allowed: finite values"):
        layer(x)
    assert not issubclass(NonFiniteError, NestlearnError)
    assert not nestlearn.debug.debug_checks_enabled()  # the context restored the default


def test_debug_switch_catches_an_out_of_range_gate(monkeypatch):
    layer, x, _ = memory_and_gates()
    poison_gates(layer, monkeypatch, 0, 1.5)
    nestlearn.debug_checks(True)
    try:
        with pytest.raises(NestlearnError, match=r"^alpha: got values in \[.*, 1\.5\]; "
                                                 r"allowed: values in \[0\.0, 1\.0\]"):
            layer(x)
    finally:
        nestlearn.debug_checks(None)


def test_debug_switch_from_the_environment(monkeypatch):
    layer, x, _ = memory_and_gates()
    poison_gates(layer, monkeypatch, 1, float("inf"))
    monkeypatch.setenv("NESTLEARN_DEBUG_CHECKS", "1")
    with pytest.raises(NonFiniteError, match=r"^eta: got non-finite"):
        layer(x)
    monkeypatch.setenv("NESTLEARN_DEBUG_CHECKS", "0")
    layer(x)
    with nestlearn.debug_checks(False):  # the switch wins over the environment
        monkeypatch.setenv("NESTLEARN_DEBUG_CHECKS", "1")
        layer(x)


def test_debug_switch_takes_only_a_bool():
    with pytest.raises(NestlearnError, match=r"^enabled: got 1; allowed: None, true or false"):
        nestlearn.debug_checks(1)


def deep_memory_inputs(alpha_value: float):
    torch.manual_seed(0)
    q, k, v = (torch.nn.functional.normalize(torch.randn(1, 6, 2, 4), dim=-1)
               for _ in range(3))
    alpha = torch.full((1, 6, 2), alpha_value)
    eta = torch.full((1, 6, 2), 0.1)
    state = DeepMemoryState(init_deep_memory_weights(2, 4, 8), None)
    return (q, k, v, alpha, eta), state


def test_direct_op_call_checks_values_once(monkeypatch):
    args, state = deep_memory_inputs(float("nan"))
    with pytest.raises(NonFiniteError, match=r"^alpha: got non-finite values"):
        deep_memory(*args, initial_state=state, chunk_size=2)
    args, state = deep_memory_inputs(1.5)
    with pytest.raises(NestlearnError, match=r"^alpha: got values in \[1\.5, 1\.5\]"):
        deep_memory(*args, initial_state=state, chunk_size=2)
    q, k, v, alpha, eta = deep_memory_inputs(2.0)[0]
    with pytest.raises(NestlearnError, match=r"^alpha: got values"):
        gated_delta_rule(q, k, v, alpha, eta)
    # check_values=False skips the read; the switch turns it back on
    args, state = deep_memory_inputs(0.5)
    counter = SyncCounter(monkeypatch)
    deep_memory(*args, initial_state=state, chunk_size=2)
    assert counter.calls  # a direct call reads its gates (one sync per gate)
    counter.calls.clear()
    deep_memory(*args, initial_state=state, chunk_size=2, check_values=False)
    assert not counter.calls
    bad_args, bad_state = deep_memory_inputs(1.5)
    deep_memory(*bad_args, initial_state=bad_state, chunk_size=2, check_values=False)
    with nestlearn.debug_checks(), pytest.raises(NestlearnError, match=r"^alpha"):
        deep_memory(*bad_args, initial_state=bad_state, chunk_size=2, check_values=False)


@pytest.mark.parametrize(("recipe", "teach"), [("tiny-hope", "lm"), ("tiny-hope", "local"),
                                              ("tiny-titans", None)])
def test_the_trainer_s_graphed_step_does_not_sync(recipe, teach, tmp_path, monkeypatch):
    # what train.cuda_graph captures (the loss, HOPE's LM teach signal included, and the
    # backward) must never wait for the device, or its capture fails on a GPU
    from nestlearn.training import Trainer
    from trainkit import tiny_config, write_corpus

    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=60)
    extra = [f"model.cms.teach_signal={teach}"] if teach else []
    config = tiny_config(corpus, tmp_path / "run", "data.sampling=windows",
                         "train.state_reset=document", *extra, recipe=recipe)
    trainer = Trainer(config, progress=False)
    try:
        assert trainer.teach_signal == (teach == "lm")
        inputs, targets = trainer.sampler.next_batch()[:2]
        with nestlearn.debug_checks(False):
            trainer.graphed_loss(inputs, targets)  # the first call builds what is cached
            counter = SyncCounter(monkeypatch)
            reads = profiled_syncs(lambda: trainer.graphed_loss(inputs, targets)[0].backward())
    finally:
        trainer.lock.release()
    assert dict(counter.calls) == {}
    assert reads == {}
