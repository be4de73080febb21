import math

import pytest
import torch

from model_cases import tiny_model
from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.data.tokens import write_token_file
from nestlearn.errors import NestlearnError
from nestlearn.evaluate.perplexity import evaluate_split
from nestlearn.evaluate.stream import bucket_edges, evaluate_stream, token_losses

VOCAB = ByteTokenizer().vocab_size


def documents(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ["".join(chr(97 + int(c)) for c in torch.randint(0, 6, (n,), generator=generator))
            for n in lengths]


@pytest.fixture
def token_file(tmp_path):
    # lengths cross every bucket edge used below, and differ, so rows finish at other times
    return write_token_file(tmp_path / "docs", documents([37, 5, 22, 61, 14]), ByteTokenizer())


def per_document_reference(model, token_file, edges):
    """One document at a time, read in one pass (no batching, no segments)."""
    sums = [0.0] * (len(edges) + 1)
    counts = [0] * (len(edges) + 1)
    for index in range(token_file.num_documents):
        span = torch.from_numpy(token_file.document(index).astype("int64"))
        logits, _ = model(span[None, :-1])
        losses = token_losses(logits, span[None, 1:])[0]
        for position, loss in enumerate(losses.tolist()):
            bucket = sum(position >= edge for edge in edges)
            sums[bucket] += loss
            counts[bucket] += 1
    return sums, counts


@pytest.mark.parametrize("arch", ["titans", "hope-attention"])
def test_stream_equals_one_document_at_a_time(arch, token_file):
    model = tiny_model(arch, vocab_size=VOCAB)
    edges = (8, 16, 32)
    result = evaluate_stream(model, token_file, segment_len=6, batch_size=3, buckets=edges)
    sums, counts = per_document_reference(model, token_file, edges)
    assert [b.tokens for b in result.buckets] == counts
    for bucket, s, c in zip(result.buckets, sums, counts, strict=True):
        assert bucket.loss == pytest.approx(s / c, rel=1e-10)
    assert result.loss == pytest.approx(sum(sums) / sum(counts), rel=1e-10)
    assert result.tokens == sum(counts) == token_file.num_tokens - 1
    # the buckets add up to the overall loss
    assert sum(b.loss * b.tokens for b in result.buckets) / result.tokens == pytest.approx(
        result.loss, rel=1e-12)
    assert result.documents == 5 and result.ppl == pytest.approx(math.exp(result.loss))


def test_batching_does_not_change_the_result(token_file):
    model = tiny_model("titans", vocab_size=VOCAB)
    one = evaluate_stream(model, token_file, segment_len=5, batch_size=1, buckets=(16,))
    many = evaluate_stream(model, token_file, segment_len=5, batch_size=4, buckets=(16,))
    assert many.loss == pytest.approx(one.loss, rel=1e-12)
    for a, b in zip(one.buckets, many.buckets, strict=True):
        assert (a.tokens, b.loss) == (b.tokens, pytest.approx(a.loss, rel=1e-12))


def test_carried_state_matters(token_file):
    """The stream loss differs from windows of the same length read from an empty state."""
    model = tiny_model("titans", vocab_size=VOCAB)
    stream = evaluate_stream(model, token_file, segment_len=8, batch_size=2)
    windows = evaluate_split(model, token_file, seq_len=8, batch_size=2)
    assert stream.tokens == windows.tokens
    assert abs(stream.loss - windows.loss) > 1e-4


def test_max_documents_and_progress(token_file):
    model = tiny_model("transformer", vocab_size=VOCAB)
    calls = []
    result = evaluate_stream(model, token_file, segment_len=16, batch_size=2, max_documents=3,
                             progress=lambda done, total: calls.append((done, total)))
    assert result.documents == 3
    assert result.tokens == sum(len(token_file.document(i)) - 1 for i in range(3))
    assert calls[-1] == (result.tokens, result.tokens)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_default_buckets_double_from_512():
    assert bucket_edges(None, 100) == ()
    assert bucket_edges(None, 3000) == (512, 1024, 2048)
    assert bucket_edges((4, 9), 3) == (4, 9)


@pytest.mark.parametrize("bad", [(), (0, 4), (4, 4), (8, 4), (1.5,), (True,)])
def test_bad_buckets_are_refused(bad):
    with pytest.raises(NestlearnError, match="buckets"):
        bucket_edges(bad, 10)


def test_bad_arguments_are_refused(token_file):
    model = tiny_model("transformer", vocab_size=VOCAB)
    with pytest.raises(NestlearnError, match="segment_len"):
        evaluate_stream(model, token_file, segment_len=0, batch_size=1)
    with pytest.raises(NestlearnError, match="max_documents"):
        evaluate_stream(model, token_file, segment_len=4, batch_size=1, max_documents=0)


def test_labels_and_round_trip(token_file):
    from nestlearn.evaluate.stream import PositionBucket, StreamEvalResult

    assert PositionBucket(512, 1024, 1.0, 3).label == "512-1k"
    assert PositionBucket(2048, None, 1.0, 3).label == "2k+"
    model = tiny_model("transformer", vocab_size=VOCAB)
    result = evaluate_stream(model, token_file, segment_len=16, batch_size=2, buckets=(4, 40))
    assert StreamEvalResult.from_dict(result.to_dict()) == result
    assert result.buckets[-1].tokens > 0 and result.buckets[-1].end is None


def test_length_sorted_windows_score_as_the_document_order_windows(token_file):
    from nestlearn.data.tokens import EvalWindows
    from nestlearn.evaluate.perplexity import evaluate_batches, tokens_per_byte
    from nestlearn.evaluate.windows import LengthSortedWindows

    model = tiny_model("titans", vocab_size=VOCAB)
    reference = evaluate_batches(model, EvalWindows(token_file, 16, 3),
                                 tokens_per_byte(token_file))
    result = evaluate_split(model, token_file, seq_len=16, batch_size=3)
    assert result.tokens == reference.tokens == token_file.num_tokens - 1
    assert result.loss == pytest.approx(reference.loss, rel=1e-12)
    batches = list(LengthSortedWindows(token_file, 16, 3))
    # full windows together first, then narrower batches of the documents' last windows
    assert [inputs.shape[1] for inputs, _ in batches] == [16, 16, 15, 6]
    assert sum(int((t != -100).sum()) for _, t in batches) == result.tokens


def test_markdown_table_and_plot(tmp_path, monkeypatch):
    import sys

    from nestlearn.evaluate.report import markdown_table, plot_loss_by_position
    from nestlearn.evaluate.stream import PositionBucket, StreamEvalResult

    def result(losses, edges):
        starts, ends = (0, *edges), (*edges, None)
        buckets = tuple(PositionBucket(s, e, loss, 0 if loss is None else 10)
                        for s, e, loss in zip(starts, ends, losses, strict=True))
        return StreamEvalResult(2.0, math.exp(2.0), 1.0, 20, 2, 8, buckets)

    results = {"titans": result([2.5, 1.5, None], (512, 1024)), "hope": result([2.4, 1.6], (512,))}
    assert markdown_table(results).splitlines() == [
        "| positions | titans | hope |",
        "|---|---:|---:|",
        "| 0-512 | 2.5000 (10) | 2.4000 (10) |",
        "| 512-1k | 1.5000 (10) |  |",
        "| 512+ |  | 1.6000 (10) |",
        "| 1k+ |  |  |",
        "| all | 2.0000 (20) | 2.0000 (20) |",
    ]
    path = plot_loss_by_position(results, tmp_path / "plot.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(NestlearnError, match="matplotlib is not installed"):
        plot_loss_by_position(results, tmp_path / "other.png")
