"""What a run folder holds and how it is read back: the `data tokenize` layout, one copy of
the weights, from_pretrained for eval and generate, and run folders of the older layout."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nestlearn.cli import main
from nestlearn.data.dataset import DATASET_FILE, tokenize_corpus
from nestlearn.models import from_pretrained, save_pretrained
from nestlearn.training import Trainer, load_trained, train
from nestlearn.training import checkpoint as ckpt
from nestlearn.training.metrics_log import read_records
from trainkit import tiny_config, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt", paragraphs=60)


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    train(tiny_config(corpus, run, "train.steps=3"), progress=False)
    return run


def _train_losses(run_dir):
    return [r["loss"] for r in read_records(run_dir) if r["split"] == "train"]


def test_a_run_tokenizes_its_corpus_as_data_tokenize_does(corpus, trained_run, tmp_path):
    tokenized = tokenize_corpus(str(corpus), tmp_path / "tokens")
    run_data = trained_run / "data"
    assert (run_data / DATASET_FILE).is_file()
    for split, token_file in tokenized.splits.items():
        assert (run_data / f"{split}.bin").read_bytes() == token_file.bin_path.read_bytes()
    assert not (trained_run / "tokenizer").exists()


def test_training_reads_the_data_tokenize_folder(corpus, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    assert main(["data", "tokenize", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--out", str(tokens)]) == 0
    capsys.readouterr()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # the config names the byte tokenizer: the folder's BPE tokenizer decides
    trainer = Trainer(tiny_config(tokens, straight, "train.steps=4"), progress=False)
    assert trainer.sampler.token_file.bin_path == tokens / "train.bin"
    assert trainer.config.data.tokenizer == "bpe"
    assert trainer.config.model.vocab_size == trainer.data.tokenizer.vocab_size
    trainer.run()
    assert not (straight / "data").exists()  # read in place, not copied

    config = tiny_config(tokens, resumed, "train.steps=4")
    assert train(config, progress=False, stop_at=2).status == "interrupted"
    assert train(config, resume=True, progress=False).status == "completed"
    assert _train_losses(resumed) == _train_losses(straight)

    assert main(["eval", str(straight), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 4 and report["tokens"] > 0


def test_a_run_stores_its_weights_once(trained_run):
    model, _, _, _ = load_trained(trained_run)
    names = set(model.state_dict())
    copies = {name: 0 for name in names}
    for path in trained_run.rglob("*.safetensors"):
        for key in load_file(str(path)):
            if key in copies:
                copies[key] += 1
    assert set(copies.values()) == {1}
    assert [p.name for p in ckpt.list_checkpoints(trained_run)] == ["step_00000003"]
    assert not (trained_run / "model").exists()


def test_eval_and_generate_load_the_model_with_from_pretrained(trained_run, monkeypatch,
                                                               capsys):
    import nestlearn.models

    loaded = []

    def recording(directory, device="cpu"):
        loaded.append(directory)
        return from_pretrained(directory, device)

    monkeypatch.setattr(nestlearn.models, "from_pretrained", recording)
    latest = ckpt.latest_checkpoint(trained_run)
    assert main(["eval", str(trained_run), "--max-batches", "1"]) == 0
    assert main(["generate", str(trained_run), "--prompt", "The", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert loaded == [latest, latest]
    # the checkpoint folder is a save_pretrained folder: the same weights as the trainer's
    model = from_pretrained(latest)
    weights = load_file(str(latest / ckpt.MODEL_FILE))
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def _as_older_layout(run):
    """Rewrite a run folder the way runs were written before: tokenizer in RUN/tokenizer/,
    token files of the train and eval splits only, checkpoints without the model's
    config.json, and a second copy of the final weights in RUN/model/."""
    model, _, _, _ = load_trained(run)
    (run / "tokenizer").mkdir()
    (run / "data" / "tokenizer.json").rename(run / "tokenizer" / "tokenizer.json")
    for name in (DATASET_FILE, "test.bin", "test.json"):
        (run / "data" / name).unlink()
    latest = ckpt.latest_checkpoint(run)
    (latest / ckpt.MODEL_CONFIG_FILE).unlink()
    manifest = json.loads((latest / ckpt.MANIFEST).read_text())
    del manifest["files"][ckpt.MODEL_CONFIG_FILE]
    (latest / ckpt.MANIFEST).write_text(json.dumps(manifest))
    save_pretrained(model, run / "model")


def test_a_run_folder_of_the_older_layout_still_evaluates_and_generates(trained_run, tmp_path,
                                                                        capsys):
    older = tmp_path / "older"
    shutil.copytree(trained_run, older)
    _as_older_layout(older)
    outputs = {}
    for run in (trained_run, older):
        assert main(["eval", str(run), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert main(["generate", str(run), "--prompt", "The king", "--max-new-tokens", "12",
                     "--temperature", "0"]) == 0
        outputs[run] = (report["loss"], report["tokens"], capsys.readouterr().out)
    assert outputs[older] == outputs[trained_run]
    assert main(["eval", str(older), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "test"
