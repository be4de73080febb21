"""nestlearn.training.cuda_graph and ``train.cuda_graph``, on CPU.

A CUDA graph needs a GPU; here a stand-in backend replays a "graph" by rerunning the captured
function and writing its outputs and gradients into the tensors the capture returned, which is
what a graph's kernels do. That ties the plumbing (static inputs, gradients put back after
callers drop them, one graph per shape, the Trainer's step) to the eager step. Unlike a real
graph, the stand-in reruns Python on every replay, so it cannot show a value baked in at
capture time; the real capture is checked on a GPU by ``bench/gpu_train_graph.py``
(``bench/gpu_check.sh``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from graph_standin import ReplayByRerun
from nestlearn.errors import NestlearnError, NonFiniteError
from nestlearn.training import Trainer
from nestlearn.training.cuda_graph import GraphedBackward
from trainkit import tiny_config, write_corpus


def small_problem() -> tuple[torch.nn.Module, Callable[..., Any]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model.double()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # gets no gradient
    model.register_parameter("unused", unused)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        error = (model(x).squeeze(-1) - y).square()
        return error.mean(), error.sum().detach()

    return model, loss_fn


def test_every_call_leaves_the_eager_step_s_gradients_and_losses():
    model, loss_fn = small_problem()
    parameters = list(model.parameters())
    backend = ReplayByRerun(parameters)
    graphed = GraphedBackward(loss_fn, parameters, warmup_steps=2, backend=backend)
    for call in range(6):
        x = torch.randn(5, 4, dtype=torch.float64)
        y = torch.randn(5, dtype=torch.float64)
        mean, total = graphed(x, y)
        got = [None if p.grad is None else p.grad.clone() for p in parameters]
        model.zero_grad(set_to_none=True)  # a caller dropping the gradients between steps
        expected_mean, expected_total = loss_fn(x, y)
        expected_mean.backward()
        torch.testing.assert_close(mean, expected_mean.detach(), rtol=1e-14, atol=0)
        torch.testing.assert_close(total, expected_total, rtol=1e-14, atol=0)
        for grad, p in zip(got, parameters, strict=True):
            if p.grad is None:
                assert grad is None
            else:
                torch.testing.assert_close(grad, p.grad, rtol=1e-14, atol=0)
        with torch.no_grad():  # the parameters move between steps, as under an optimizer
            for p in parameters:
                p.sub_(0.1 * (p.grad if p.grad is not None else 0))
        model.zero_grad(set_to_none=True)
        assert backend.captures == (1 if call >= 2 else 0)
        assert not mean.requires_grad and not total.requires_grad


def test_a_new_shape_gets_its_own_warm_up_and_graph():
    model, loss_fn = small_problem()
    parameters = list(model.parameters())
    backend = ReplayByRerun(parameters)
    graphed = GraphedBackward(loss_fn, parameters, warmup_steps=1, backend=backend)
    for rows in (5, 5, 7, 5, 7, 7):
        graphed(torch.randn(rows, 4, dtype=torch.float64), torch.randn(rows, dtype=torch.float64))
    assert backend.captures == 2 and len(graphed.graphs) == 2


def test_a_failed_capture_is_one_clear_error():
    model, loss_fn = small_problem()

    class FailingCapture(ReplayByRerun):
        def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    graphed = GraphedBackward(loss_fn, model.parameters(), warmup_steps=1,
                              backend=FailingCapture(list(model.parameters())))
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    graphed(x, y)
    with pytest.raises(NestlearnError, match=r"could not be captured as a CUDA graph: "
                       r"RuntimeError: operation not permitted when stream is capturing\. "
                       r".*train\.cuda_graph=false"):
        graphed(x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("warmup", [0, -1, 1.5, True])
def test_warmup_steps_must_be_a_positive_int(warmup):
    model, loss_fn = small_problem()
    with pytest.raises(NestlearnError, match=r"warmup_steps: got .*; allowed: an int >= 1"):
        GraphedBackward(loss_fn, model.parameters(), warmup_steps=warmup)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt")


@pytest.mark.parametrize(("recipe", "extra"), [("tiny-transformer", ()), ("tiny-hope", ()),
                                               ("tiny-hope", ("model.cms.teach_signal=lm",))])
def test_trainer_step_replayed_equals_the_eager_step(corpus, tmp_path, recipe, extra):
    # float64, so that the mean loss's two forms (loss_sum / count against
    # loss_sum * (1 / count)) agree far below what a wrong step would change
    results = []
    for graphed in (False, True):
        config = tiny_config(corpus, tmp_path / str(graphed), "train.steps=6",
                             "train.dtype=float64", "data.sampling=windows",
                             "train.state_reset=document", *extra, recipe=recipe)
        trainer = Trainer(config, progress=False)
        assert trainer.teach_signal == bool(extra)
        if graphed:  # the Trainer's own loss, with the stand-in backend put in by hand
            parameters = list(trainer.model.parameters())
            backend = ReplayByRerun(parameters)
            trainer.graphed = GraphedBackward(trainer.graphed_loss, parameters, warmup_steps=2,
                                              backend=backend)
        result = trainer.run()
        if graphed:
            assert backend.captures == 1 and len(trainer.graphed.graphs) == 1
        results.append((result.losses, [p.detach().clone() for p in trainer.model.parameters()]))
    (eager_losses, eager_params), (graph_losses, graph_params) = results
    assert sorted(graph_losses) == sorted(eager_losses) == list(range(1, 7))
    for step, loss in eager_losses.items():
        assert graph_losses[step] == pytest.approx(loss, rel=1e-12)
    for graph_param, eager_param in zip(graph_params, eager_params, strict=True):
        torch.testing.assert_close(graph_param, eager_param, rtol=1e-10, atol=1e-12)


def test_cuda_graph_on_a_cpu_or_a_stream_run_is_refused_by_name(corpus, tmp_path):
    # what the config alone rules out is refused before the run builds anything
    refusals = {
        ("train.device=cpu",): r"train\.cuda_graph: got true with train\.device='cpu'; "
                               r"allowed: true on a CUDA device",
        ("train.device=cuda", "data.sampling=stream", "train.state_reset=never"):
            r"train\.cuda_graph: got true with data\.sampling='stream'; "
            r"allowed: data\.sampling='windows'",
        ("train.device=cuda", "model.checkpoint_segment=16"):
            r"train\.cuda_graph: got true with model\.checkpoint_segment=16; "
            r"allowed: model\.checkpoint_segment=None",
    }
    for sets, message in refusals.items():
        # the order of --set does not matter: cuda_graph first, the device after
        config = tiny_config(corpus, tmp_path / "run", "train.cuda_graph=true", *sets)
        with pytest.raises(NestlearnError, match=message):
            Trainer(config, progress=False)
        assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="'auto' picks CUDA on a GPU machine")
def test_cuda_graph_where_auto_resolves_to_a_cpu_is_refused_by_name(corpus, tmp_path):
    # the device "auto" resolves to is known when the run starts
    config = tiny_config(corpus, tmp_path / "auto", "train.cuda_graph=true", "train.device=auto")
    with pytest.raises(NestlearnError, match=r"train\.cuda_graph: got true, but this run is "
                       r"on cpu \(train\.device='auto'\); allowed: true on a CUDA device"):
        Trainer(config, progress=False)
    assert not (tmp_path / "auto" / "checkpoints").exists()


def test_a_nan_loss_under_the_graph_stops_before_the_update(corpus, tmp_path):
    # the loss check runs after the replay and before the optimizer: the parameters stay
    config = tiny_config(corpus, tmp_path / "run", "train.steps=10")
    trainer = Trainer(config, progress=False)
    parameters = list(trainer.model.parameters())
    trainer.graphed = GraphedBackward(trainer.graphed_loss, parameters, warmup_steps=2,
                                      backend=ReplayByRerun(parameters))
    forward = trainer.model.forward

    def nan_logits(ids, state=None):
        logits, new_state = forward(ids, state)
        return (logits * float("nan") if trainer.step + 1 == 4 else logits), new_state

    trainer.model.forward = nan_logits
    before: list[torch.Tensor] = []
    original_step = trainer.train_step

    def step_keeping_parameters():
        if trainer.step + 1 == 4:
            before.extend(p.detach().clone() for p in parameters)
        return original_step()

    trainer.train_step = step_keeping_parameters
    with pytest.raises(NonFiniteError, match="step 4: NaN/Inf in the loss"):
        trainer.run()
    # steps 1 and 2 warmed up, step 3 captured: step 4 was a replay
    assert list(trainer.graphed.warm_calls.values()) == [2] and len(trainer.graphed.graphs) == 1
    for p, saved in zip(parameters, before, strict=True):
        torch.testing.assert_close(p.detach(), saved, rtol=0, atol=0)
