"""The task harness: scoring and grouping, seeded training, and a model that learns."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
from torch import nn

from nestlearn.errors import NestlearnError
from nestlearn.models import build_model
from nestlearn.tasks import mqar
from nestlearn.tasks.gates import memory_gate_stats
from nestlearn.tasks.models import base_config, task_model_configs
from nestlearn.tasks.registry import TASK_NAMES, expand, task_spec
from nestlearn.tasks.scoring import AnswerScores, bucket, score_answers, table_values
from nestlearn.tasks.spec import Budget, Table, TaskSpec
from nestlearn.tasks.training import eval_rng, train_model

VOCAB = mqar.MQARVocab(keys=8, values=8)


class RecallOracle(nn.Module):
    """Solves MQAR by lookup: at a key that was seen before, predict the value that followed
    it; everywhere else predict value 0. Returns (logits, None) like a causal LM."""

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits = torch.zeros(*ids.shape, VOCAB.size)
        for row in range(ids.shape[0]):
            seen: dict[int, int] = {}
            tokens = ids[row].tolist()
            for t, token in enumerate(tokens):
                logits[row, t, seen.get(token, VOCAB.value(0))] = 10.0
                is_key = VOCAB.key(0) <= token < VOCAB.key(VOCAB.keys)
                if is_key and token not in seen and t + 1 < len(tokens):
                    seen[token] = tokens[t + 1]
        return logits, None


def test_an_oracle_scores_one_and_value_zero_scores_its_share():
    rng = random.Random(0)
    examples = [mqar.mqar_example(rng, n, vocab=VOCAB) for n in (2, 4, 6) for _ in range(5)]
    scores = score_answers(RecallOracle(), examples, pad_id=mqar.PAD, batch_size=4)
    assert len(scores.correct) == sum(len(e.answers) for e in examples)
    by_pairs = table_values(scores, Table("t", ("pairs",), "accuracy"))
    assert by_pairs == {(2,): 1.0, (4,): 1.0, (6,): 1.0}
    assert table_values(scores, Table("t", ("pairs",), "exact")) == by_pairs
    # a constant guess is right exactly where the answer is value 0
    constant = score_answers(_Constant(VOCAB.value(0)), examples, mqar.PAD)
    truth = [t == VOCAB.value(0) for e in examples for t in e.answer_tokens]
    assert constant.correct == truth


class _Constant(nn.Module):
    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits = torch.zeros(*ids.shape, VOCAB.size)
        logits[..., self.token] = 5.0
        return logits, None


def test_table_values_accuracy_exact_loss_buckets_and_filters():
    scores = AnswerScores(example=[0, 0, 1, 1, 2], correct=[True, False, True, True, False],
                          loss=[0.5, 1.5, 1.0, 3.0, 2.0],
                          tags={"n": [1, 1, 1, 1, 2], "d": [3, 5, 4, 7, 9]})
    assert table_values(scores, Table("t", ("n",), "accuracy")) == {(1,): 0.75, (2,): 0.0}
    assert table_values(scores, Table("t", ("n",), "exact")) == {(1,): 0.5, (2,): 0.0}
    assert table_values(scores, Table("t", ("n",), "loss")) == {(1,): 1.5, (2,): 2.0}
    assert table_values(scores, Table("t", ("d",), "accuracy", buckets=("d",))) == {
        (2,): 1.0, (4,): 2 / 3, (8,): 0.0}
    only_two = Table("t", ("n",), "accuracy", where=(("n", 2),))
    assert table_values(scores, only_two) == {(2,): 0.0}
    assert [bucket(v) for v in (0, 1, 2, 3, 4, 7, 8)] == [0, 1, 2, 2, 4, 4, 8]


def _easy_recall() -> TaskSpec:
    """One or two pairs over 8 keys and 8 values: the answer is the token after the earlier
    copy of the query. A trained transformer reaches about 0.45-0.6 on two pairs within 60
    steps; guessing gets 1/8, and a model whose targets were misaligned could not beat it."""
    def example(rng: random.Random):
        return mqar.mqar_example(rng, rng.randint(1, 2), vocab=VOCAB)

    def eval_set(rng: random.Random):
        return [mqar.mqar_example(rng, 2, vocab=VOCAB) for _ in range(64)]

    return TaskSpec("easy-recall", "easy recall", VOCAB.size, mqar.PAD, example, eval_set,
                    Budget(60, 16, lr=1e-2), (Table("accuracy", ("pairs",), "accuracy"),))


def test_training_a_transformer_on_easy_recall_beats_chance():
    spec = _easy_recall()
    config = base_config("transformer", spec.vocab_size)
    torch.set_num_threads(1)
    model, losses = train_model(spec, config, seed=0, budget=spec.budget)
    scores = score_answers(model, spec.eval_examples(eval_rng(spec)), spec.pad_id)
    accuracy = table_values(scores, spec.tables[0])[(2,)]
    assert accuracy > 0.3, accuracy  # chance: 1/8
    assert sum(losses[-10:]) < sum(losses[:10])


def test_training_is_seeded():
    spec = dataclasses.replace(_easy_recall(), budget=Budget(3, 4))
    config = base_config("titans", spec.vocab_size)
    _, first = train_model(spec, config, seed=1, budget=spec.budget)
    _, again = train_model(spec, config, seed=1, budget=spec.budget)
    _, other = train_model(spec, config, seed=2, budget=spec.budget)
    assert first == again and first != other


def test_task_models_use_short_memory_chunks_and_sets_reach_the_archs_that_have_them():
    configs = task_model_configs(["transformer", "titans", "hope"], 40,
                                 ["memory.chunk_size=8", "dim=48"])
    assert configs["titans"].memory.chunk_size == 8 and configs["hope"].memory.chunk_size == 8
    assert all(c.dim == 48 and c.vocab_size == 40 for c in configs.values())
    assert base_config("titans-mag", 40).attention.window == 32
    assert base_config("hope", 40).memory.inner_chunk_size == 16
    with pytest.raises(NestlearnError, match=re.escape("--set memory.chunk_size=8: no arch")):
        task_model_configs(["transformer"], 40, ["memory.chunk_size=8"])
    with pytest.raises(NestlearnError, match="--set dim=0"):
        task_model_configs(["transformer"], 40, ["dim=0"])
    with pytest.raises(NestlearnError, match="--archs: got 'gpt'"):
        task_model_configs(["gpt"], 40)
    with pytest.raises(NestlearnError, match="--set arch=hope: arch is set by the task run"):
        task_model_configs(["transformer"], 40, ["arch=hope"])


def test_every_task_builds_and_its_examples_fit_its_vocabulary():
    for name in TASK_NAMES:
        spec = task_spec(name, quick=True)
        example = spec.train_example(random.Random(0))
        assert max(example.tokens) < spec.vocab_size
        assert all(t.metric in ("accuracy", "exact", "loss") for t in spec.tables)
    assert expand("formal") == ("parity", "aa-star", "abab-star", "anbn", "anbncn",
                                "shuffle-2")
    with pytest.raises(NestlearnError, match="task: got 'nope'"):
        expand("nope")
    with pytest.raises(NestlearnError, match="--corpus"):
        task_spec("mqar", corpus="wiki")
    with pytest.raises(NestlearnError, match="--corpus"):
        task_spec("s-niah-2", corpus="elsewhere")


def test_gate_stats_read_the_titans_gates_at_their_initial_values():
    rng = random.Random(0)
    examples = [mqar.mqar_example(rng, n, vocab=VOCAB) for n in (2, 5)]
    torch.manual_seed(0)
    titans = build_model(base_config("titans", VOCAB.size))
    stats = memory_gate_stats(titans, examples, mqar.PAD)
    memory = base_config("titans", VOCAB.size).memory
    assert [s["layer"] for s in stats] == [0, 1]
    for s in stats:
        assert s["chunk_size"] == 16 and s["eta_max"] == memory.resolved_eta_max
        # small random weights: the gates sit near the values their biases set
        assert abs(s["eta_fraction"] - memory.eta_init) < 0.05
        assert abs(s["theta"] - memory.theta_init) < 0.05
        assert s["forget"] < 10 * memory.forget_init
    assert memory_gate_stats(build_model(base_config("transformer", VOCAB.size)), examples,
                             mqar.PAD) == []
