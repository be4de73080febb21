"""``eval --stream``, ``--checkpoint``, progress and streamed ``generate`` from the command line."""

import io
import json
import shutil

import pytest
import torch

from nestlearn.cli import main
from nestlearn.cli.generate import TextStream
from nestlearn.cli.progress import ProgressBar
from nestlearn.data.tokenizers import ByteTokenizer
from nestlearn.evaluate.perplexity import evaluate_batches
from nestlearn.losses import IGNORE_INDEX
from trainkit import tiny_sets, write_corpus


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny titans run of 4 steps with checkpoints at steps 2 and 4, and a copy of it."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "verse.txt", paragraphs=60)
    run = root / "a"
    assert main(["train", "--recipe", "tiny-titans", "--out", str(run), "--no-progress",
                 *tiny_sets(f"data.corpus={corpus}", "train.steps=4", "train.checkpoint_every=2",
                            "model.dim=16")]) == 0
    shutil.copytree(run, root / "b")
    return [run, root / "b"]


def test_eval_stream_reports_loss_by_position(runs, capsys):
    capsys.readouterr()
    assert main(["eval", str(runs[0]), "--stream", "--segment-len", "16", "--buckets", "32,64",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "stream" and report["segment_len"] == 16 and report["step"] == 4
    assert [b["label"] for b in report["buckets"]] == ["0-32", "32-64", "64+"]
    assert sum(b["tokens"] for b in report["buckets"]) == report["tokens"] > 100
    saved = json.loads((runs[0] / "eval_stream_validation.json").read_text())
    assert saved == report


def test_eval_compares_runs_in_one_plot(runs, tmp_path, capsys):
    plot = tmp_path / "by_position.png"
    assert main(["eval", *map(str, runs), "--stream", "--buckets", "32", "--max-documents",
                 "4", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = plot.with_suffix(".md").read_text()
    assert table.splitlines()[0] == "| positions | a | b |"
    assert "| 0-32 |" in table and "| 32+ |" in table and table in out


def test_checkpoint_picks_an_earlier_step(runs, capsys):
    capsys.readouterr()
    assert main(["eval", str(runs[0]), "--checkpoint", "2", "--json", "--max-batches",
                 "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 2 and report["checkpoint"].endswith("step_00000002")
    assert (runs[0] / "eval_validation_step_2.json").exists()
    assert main(["eval", str(runs[0]), "--checkpoint", "step_00000004", "--json",
                 "--max-batches", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert main(["generate", str(runs[0]), "--checkpoint",
                 str(runs[0] / "checkpoints" / "step_00000002"), "--prompt", "The",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The")


@pytest.mark.parametrize(("args", "expected"), [
    (["eval", "RUN", "--checkpoint", "3"], "--checkpoint: got '3'; allowed: a saved step of"),
    (["generate", "RUN", "--checkpoint", "nope"], "(2, 4)"),
    (["eval", "RUN", "--segment-len", "8"], "--segment-len: only with --stream"),
    (["eval", "RUN", "--plot", "x.png"], "--plot: only with --stream"),
    (["eval", "RUN", "--stream", "--segment-len", "0"], "--segment-len: got 0; allowed: an"),
    (["eval", "RUN", "--stream", "--buckets", "64,32"], "--buckets: got '64,32'; allowed"),
    (["eval", "RUN", "--stream", "--seq-len", "8"], "--seq-len: not with --stream"),
])
def test_bad_options_are_one_line(runs, args, expected, capsys, tmp_path):
    capsys.readouterr()
    args = [str(runs[0]) if arg == "RUN" else arg for arg in args]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nestlearn {args[0]}: error: ")
    assert expected.replace("(2, 4)", "2, 4") in lines[0]


def test_generate_writes_the_text_the_library_samples(runs, capsys):
    from nestlearn.models import generate
    from nestlearn.training import load_trained

    capsys.readouterr()
    assert main(["generate", str(runs[1]), "--prompt", "The king", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    model, _, tokenizer, _ = load_trained(runs[1])
    ids = [tokenizer.eod_id, *tokenizer.encode("The king")]
    with torch.no_grad():
        out = generate(model, torch.tensor([ids]), 12, temperature=0.0)
    assert captured.out == "The king" + tokenizer.decode(out[0, len(ids):].tolist()) + "\n"
    assert captured.err == ""


class Recorder(io.StringIO):
    def __init__(self, tty=False):
        super().__init__()
        self.tty = tty
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)

    def isatty(self):
        return self.tty


def test_text_is_written_as_tokens_arrive_and_whole_characters_only():
    tokenizer = ByteTokenizer()
    out = Recorder()
    stream = TextStream(tokenizer, out)
    for byte in "aé€".encode():  # 1, 2 and 3 bytes
        stream.add(torch.tensor([byte]))
    assert out.writes == ["a", "é", "€"]
    stream.add(torch.tensor([0xE2]))  # a character cut short: shown as U+FFFD at the end
    stream.finish()
    assert out.getvalue() == "aé€\ufffd\n"


def test_progress_bar_only_on_a_terminal():
    quiet = Recorder(tty=False)
    with ProgressBar("eval", "tok", stream=quiet) as bar:
        bar(5, 10)
    assert quiet.getvalue() == ""
    shown = Recorder(tty=True)
    with ProgressBar("eval", "tok", stream=shown) as bar:
        bar(5, 10)
        bar(10, 10)
    assert "100%" in shown.getvalue()
    off = Recorder(tty=True)
    with ProgressBar("eval", "tok", enabled=False, stream=off) as bar:
        bar(5, 10)
    assert off.getvalue() == ""


def test_eval_runs_only_the_columns_a_batch_needs():
    widths = []

    class Uniform(torch.nn.Module):
        def forward(self, ids, state=None):
            widths.append(ids.shape[1])
            return torch.zeros(*ids.shape, 5), state

    inputs = torch.zeros(2, 16, dtype=torch.long)
    targets = torch.full((2, 16), IGNORE_INDEX)
    targets[0, :3] = 1
    targets[1, :5] = 2
    result = evaluate_batches(Uniform(), [(inputs, targets)], tokens_per_byte=1.0)
    assert widths == [5]
    assert result.tokens == 8 and result.loss == pytest.approx(torch.log(torch.tensor(5.0)))
