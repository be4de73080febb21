"""The lm-evaluation-harness adapter (``nestlearn.lmeval``), offline: log-likelihoods read in
segments with the state carried equal one pass, and lm-eval itself runs three local tasks
(multiple choice, rolling log-likelihood, generation) shipped in tests/fixtures/lmeval."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local files only
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.errors import NestlearnError
from nestlearn.lmeval import NestlearnLM, evaluate_tasks
from nestlearn.models import ModelConfig, build_model, generate, save_pretrained

FIXTURES = Path(__file__).parent / "fixtures" / "lmeval"
TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = ModelConfig(arch="hope", vocab_size=TOKENIZER.vocab_size, dim=16, layers=2, heads=2,
                         memory={"chunk_size": 4, "inner_chunk_size": 3},
                         cms={"chunk_sizes": (2, 6)})
    folder = tmp_path_factory.mktemp("lmeval")
    save_pretrained(build_model(config).double(), folder / "model")
    return folder / "model", TOKENIZER.save(folder / "tokenizer")


@torch.no_grad()
def one_pass_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    logits, _ = model(torch.tensor([ids]))
    scores = torch.log_softmax(logits[0, :-1].double(), -1)
    return scores.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def request(*args):
    return SimpleNamespace(args=args)


def test_segments_with_the_state_carried_equal_one_pass(model_folder):
    model_dir, tokenizer_file = model_folder
    lm = NestlearnLM(str(model_dir), tokenizer=str(tokenizer_file), segment_len=5)
    context, continuation = "The king and the queen", " speak of love and death."
    (logprob, greedy), = lm.loglikelihood([request(context, continuation)])
    ids = [TOKENIZER.eod_id, *TOKENIZER.encode(context + continuation)]
    expected = one_pass_logprobs(lm.model, ids)
    tail = len(TOKENIZER.encode(continuation))
    assert math.isclose(logprob, float(expected[-tail:].sum()), rel_tol=1e-12)
    assert greedy is False  # a random model does not predict this text
    text = "Thou art fair, my lord; the night hath a crown. " * 3
    (rolling,) = lm.loglikelihood_rolling([request(text)])
    full = one_pass_logprobs(lm.model, [TOKENIZER.eod_id, *TOKENIZER.encode(text)])
    assert math.isclose(rolling, float(full.sum()), rel_tol=1e-12)
    assert lm.loglikelihood_rolling([request("")]) == [0.0]


def test_greedy_continuation_is_recognised(model_folder):
    model_dir, tokenizer_file = model_folder
    lm = NestlearnLM(str(model_dir), tokenizer=str(tokenizer_file))
    ids = torch.tensor([[TOKENIZER.eod_id, *TOKENIZER.encode("abc")]])
    out = generate(lm.model, ids, 3, temperature=0.0)[0, ids.shape[1]:].tolist()
    continuation = bytes(out).decode("latin-1")
    if all(token < 128 for token in out):  # ASCII bytes: the text encodes back to `out`
        (_, greedy), = lm.loglikelihood([request("abc", continuation)])
        assert greedy is True


def local_tasks(tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    for file in FIXTURES.iterdir():
        text = file.read_text().replace("DATA_DIR", str(FIXTURES))
        (folder / file.name).write_text(text)
    return folder


def test_lm_eval_runs_local_tasks_through_the_registered_model(model_folder, tmp_path):
    model_dir, tokenizer_file = model_folder
    tasks = ["nestlearn_tiny_choice", "nestlearn_tiny_text", "nestlearn_tiny_generate"]
    out = evaluate_tasks(model_dir, tasks, include_path=local_tasks(tmp_path),
                         include_defaults=False, tokenizer=str(tokenizer_file),
                         bootstrap_iters=0, segment_len=7)
    results = out["results"]
    lm = NestlearnLM(str(model_dir), tokenizer=str(tokenizer_file))

    rows = [json.loads(line) for line in (FIXTURES / "choice.jsonl").read_text().splitlines()]
    correct = 0
    for row in rows:
        scores = [ll for ll, _ in lm.loglikelihood(
            [request(row["question"], choice) for choice in row["choices"]])]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    assert results["nestlearn_tiny_choice"]["acc,none"] == pytest.approx(correct / len(rows))

    texts = [json.loads(line)["text"]
             for line in (FIXTURES / "text.jsonl").read_text().splitlines()]
    total = sum(lm.loglikelihood_rolling([request(text)])[0] for text in texts)
    words = sum(len(text.split()) for text in texts)
    nbytes = sum(len(text.encode()) for text in texts)
    text_results = results["nestlearn_tiny_text"]
    assert text_results["word_perplexity,none"] == pytest.approx(math.exp(-total / words))
    assert text_results["bits_per_byte,none"] == pytest.approx(-total / nbytes / math.log(2))

    rows = [json.loads(line) for line in (FIXTURES / "generate.jsonl").read_text().splitlines()]
    outputs = lm.generate_until([request(row["question"], {"until": ["\n"], "max_gen_toks": 8})
                                 for row in rows])
    matches = [float(text == row["answer"]) for text, row in zip(outputs, rows, strict=True)]
    assert all(len(text) <= 8 and "\n" not in text for text in outputs)
    assert results["nestlearn_tiny_generate"]["exact_match,none"] == pytest.approx(
        sum(matches) / len(matches))


def test_bad_input_is_one_clear_error(model_folder, tmp_path):
    model_dir, tokenizer_file = model_folder
    from nestlearn.data.tokenizers import BPETokenizer

    bpe = BPETokenizer.train(["the king and the queen\n"] * 20, vocab_size=280)
    with pytest.raises(NestlearnError, match="tokenizer: got vocabulary 2"):
        NestlearnLM(str(model_dir), tokenizer=str(bpe.save(tmp_path / "bpe")))
    lm = NestlearnLM(str(model_dir), tokenizer=str(tokenizer_file))
    with pytest.raises(NestlearnError, match=r"generation options: got \['beams'\]"):
        lm.generate_until([request("x", {"beams": 2})])
    with pytest.raises(NestlearnError, match="segment_len: got 0"):
        NestlearnLM(str(model_dir), tokenizer=str(tokenizer_file), segment_len=0)
    seeded = [lm.generate_until([request("The", {"do_sample": True, "seed": 3,
                                                 "max_gen_toks": 6})])[0] for _ in range(2)]
    assert seeded[0] == seeded[1]
