"""The LM teach signal in evaluation and generation: the LM-driven CMS levels learn there as in
the token-by-token reference (``stream_with_teach_signal``), instead of staying frozen."""

import math

import pytest
import torch

from model_cases import random_ids, tiny_model
from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.data.tokens import write_token_file
from nestlearn.evaluate.perplexity import evaluate_batches
from nestlearn.evaluate.stream import evaluate_stream, token_losses
from nestlearn.losses import lm_loss_sum
from nestlearn.models import generate
from nestlearn.models.teaching import uses_lm_teach_signal
from nestlearn.nn.teach_signal import stream_with_teach_signal

LM_CMS = {"teach_signal": "lm", "chunk_sizes": (2, 6), "inner_lr": 0.5}


def lm_model(arch="hope-attention", **overrides):
    return tiny_model(arch, cms=LM_CMS, **overrides)


def test_only_lm_taught_models_use_the_driver():
    assert uses_lm_teach_signal(lm_model())
    assert not uses_lm_teach_signal(tiny_model("hope-attention"))
    assert not uses_lm_teach_signal(tiny_model("transformer"))


@pytest.mark.parametrize("arch", ["hope", "hope-attention"])
def test_generate_equals_the_token_by_token_reference(arch):
    model = lm_model(arch)
    prompt = random_ids(2, 1)
    shown = []
    with torch.no_grad():
        out, logits = generate(model, prompt, 9, temperature=0.0, return_logits=True,
                               on_token=shown.append)
        reference, _ = stream_with_teach_signal(model, out[:, :-1], out[:, 1:], segment_len=1)
        frozen, _ = model(out[:, :-1])
    torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)
    assert torch.equal(torch.stack(shown, dim=1), out[:, 1:])
    # the levels have learned: after the first level boundary the frozen model differs
    assert not torch.allclose(logits[:, 2:], frozen[:, 2:], rtol=1e-6, atol=1e-6)


def test_generate_reads_the_prompt_through_the_driver():
    model = lm_model()
    prompt = random_ids(2, 5, seed=3)
    with torch.no_grad():
        out, logits = generate(model, prompt, 4, temperature=0.0, return_logits=True)
        # reference: the prompt but its last token through the driver, then token by token
        _, state = stream_with_teach_signal(model, prompt[:, :-1], prompt[:, 1:])
        expected = []
        for position in range(4, 8):
            step, state = stream_with_teach_signal(model, out[:, position:position + 1],
                                                   out[:, position + 1:position + 2], state,
                                                   segment_len=1)
            expected.append(step[:, 0])
    torch.testing.assert_close(logits, torch.stack(expected, dim=1), rtol=1e-10, atol=1e-10)


def test_window_evaluation_runs_the_teach_signal():
    model = lm_model()
    ids = random_ids(3, 13, seed=5)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    result = evaluate_batches(model, [(inputs, targets)], tokens_per_byte=1.0)
    with torch.no_grad():
        driven, _ = stream_with_teach_signal(model, inputs, targets)
        frozen, _ = model(inputs)
    expected = float(lm_loss_sum(driven, targets)) / targets.numel()
    assert result.loss == pytest.approx(expected, rel=1e-12)
    assert abs(result.loss - float(lm_loss_sum(frozen, targets)) / targets.numel()) > 1e-6


def test_stream_evaluation_runs_the_teach_signal(tmp_path):
    tokenizer = ByteTokenizer()
    token_file = write_token_file(tmp_path / "docs", ["abcabcabdabcab", "cabbacab", "abcdd"],
                                  tokenizer)
    model = lm_model(vocab_size=tokenizer.vocab_size)
    result = evaluate_stream(model, token_file, segment_len=6, batch_size=2, buckets=(8,))
    total = count = 0
    frozen_total = 0.0
    with torch.no_grad():
        for index in range(token_file.num_documents):
            span = torch.from_numpy(token_file.document(index).astype("int64"))[None]
            driven, _ = stream_with_teach_signal(model, span[:, :-1], span[:, 1:])
            total += float(token_losses(driven, span[:, 1:]).sum())
            frozen_total += float(token_losses(model(span[:, :-1])[0], span[:, 1:]).sum())
            count += span.shape[1] - 1
    assert result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-10)
    assert not math.isclose(result.loss, frozen_total / count, rel_tol=1e-6)
