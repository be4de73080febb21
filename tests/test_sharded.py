"""Sharded training (train.parallel="fsdp"): FSDP2 on two gloo ranks against one process,
bitwise resume from torch.distributed.checkpoint folders, and the refused combinations."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from nestlearn.errors import NestlearnError
from nestlearn.models import from_pretrained
from nestlearn.training import checkpoint as ckpt
from nestlearn.training import train
from nestlearn.training.distributed import DistContext
from nestlearn.training.metrics_log import read_records
from nestlearn.training.runconfig import apply_overrides
from nestlearn.training.sharded import SHARDED_DIR, check_sharding
from trainkit import tiny_config, train_on_gloo_ranks, write_corpus

FSDP = "train.parallel=fsdp"


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "verse.txt", paragraphs=60)


def _rows(run_dir, key="loss"):
    return [r[key] for r in read_records(run_dir) if r["split"] == "train"]


def _single_and_sharded(corpus, tmp_path, *sets):
    train(tiny_config(corpus, tmp_path / "single", *sets), progress=False)
    train_on_gloo_ranks(tiny_config(corpus, tmp_path / "fsdp", *sets, FSDP))
    return tmp_path / "single", tmp_path / "fsdp"


def _assert_same_training(single, sharded):
    # same global batch, same update: equal up to float summation order
    assert _rows(sharded, "tokens") == _rows(single, "tokens")
    assert _rows(sharded) == pytest.approx(_rows(single), rel=1e-5, abs=1e-5)
    assert _rows(sharded, "grad_norm") == pytest.approx(_rows(single, "grad_norm"), rel=1e-4)
    a = load_file(str(ckpt.latest_checkpoint(single) / ckpt.MODEL_FILE))
    b = load_file(str(ckpt.latest_checkpoint(sharded) / ckpt.MODEL_FILE))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_on_two_ranks_matches_one_process_and_writes_a_dcp_checkpoint(corpus, tmp_path):
    # the Transformer: every block its own FSDP unit
    single, sharded = _single_and_sharded(corpus, tmp_path, "train.steps=2")
    _assert_same_training(single, sharded)

    path = ckpt.latest_checkpoint(sharded)
    files = sorted(p.name for p in (path / SHARDED_DIR).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    metadata = FileSystemReader(str(path / SHARDED_DIR)).read_metadata()
    keys = set(metadata.state_dict_metadata)
    assert "model.backbone.embed.weight" in keys
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg") for k in keys)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["payload"]["sharded"] == {"folder": SHARDED_DIR, "world_size": 2}
    assert {f"{SHARDED_DIR}/{name}" for name in files} <= set(manifest["files"])
    # the whole model is there too, for eval, generate and from_pretrained
    assert from_pretrained(path).config.dim == 32

    # a damaged shard is refused by its checksum before anything is loaded
    shard = path / SHARDED_DIR / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(NestlearnError, match=r"checksum mismatch in sharded/__1_0\.distcp"):
        ckpt.load_checkpoint(path)


@pytest.mark.slow
def test_fsdp_hope_as_one_unit_matches_one_process(corpus, tmp_path):
    # HOPE's fresh state holds its initial memories: the model is one FSDP unit
    single, sharded = _single_and_sharded(corpus, tmp_path, "train.steps=3", "model.arch=hope")
    _assert_same_training(single, sharded)


@pytest.mark.slow
def test_fsdp_stream_training_carries_each_ranks_state_as_one_process_does(corpus, tmp_path):
    single, sharded = _single_and_sharded(corpus, tmp_path, "train.steps=3",
                                          "data.sampling=stream", "train.state_reset=document")
    _assert_same_training(single, sharded)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transformer", "hope"])
def test_killed_and_resumed_fsdp_run_equals_an_uninterrupted_one_bitwise(corpus, tmp_path, arch):
    sets = ("train.steps=6", "train.checkpoint_every=3", "train.eval_every=3",
            "optim.lr=0.01", f"model.arch={arch}", FSDP)
    straight = tmp_path / "straight"
    train_on_gloo_ranks(tiny_config(corpus, straight, *sets))

    resumed = tmp_path / "resumed"
    config = tiny_config(corpus, resumed, *sets)
    train_on_gloo_ranks(config, stop_at=5)
    # killed after step 5, before its checkpoint: the run continues from step 3
    shutil.rmtree(ckpt.checkpoint_dir(resumed, 5))
    assert ckpt.latest_checkpoint(resumed) == ckpt.checkpoint_dir(resumed, 3)
    train_on_gloo_ranks(config, resume=True)

    assert _rows(resumed) == _rows(straight)  # exact float equality
    assert _rows(resumed, "grad_norm") == _rows(straight, "grad_norm")
    a = load_file(str(ckpt.latest_checkpoint(straight) / ckpt.MODEL_FILE))
    b = load_file(str(ckpt.latest_checkpoint(resumed) / ckpt.MODEL_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [r["loss"] for r in read_records(resumed) if r["split"] == "eval"]
    assert evals == [r["loss"] for r in read_records(straight) if r["split"] == "eval"]


@pytest.mark.slow
def test_fsdp_windows_run_resumes_on_another_number_of_ranks(corpus, tmp_path):
    # torch.distributed.checkpoint reshards the model and optimizer state from 2 ranks to 3
    sets = ("train.steps=4", "data.batch_size=6", "optim.lr=0.01", FSDP)
    straight = tmp_path / "straight"
    train_on_gloo_ranks(tiny_config(corpus, straight, *sets))
    resumed = tmp_path / "resumed"
    config = tiny_config(corpus, resumed, *sets)
    train_on_gloo_ranks(config, stop_at=2)
    train_on_gloo_ranks(config, world_size=3, resume=True)
    saved = json.loads((ckpt.latest_checkpoint(resumed) / ckpt.MANIFEST).read_text())
    assert saved["payload"]["sharded"]["world_size"] == 3
    assert _rows(resumed) == pytest.approx(_rows(straight), rel=1e-5, abs=1e-5)


def test_fsdp_in_one_process_is_refused_and_leaves_nothing(corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NestlearnError, match=r"train.parallel: got 'fsdp' in a single "
                                             r"process; allowed: 'ddp'"):
        train(tiny_config(corpus, out, FSDP), progress=False)
    assert not out.exists()


def test_unknown_parallel_mode_is_refused():
    with pytest.raises(NestlearnError,
                       match=r"train.parallel: got 'zero'; allowed: one of 'ddp', 'fsdp'"):
        apply_overrides(tiny_config("corpus.txt", "out"), ["train.parallel=zero"])


TWO_RANKS = DistContext(rank=0, world_size=2)


@pytest.mark.parametrize(("sets", "teach", "holds", "named"), [
    (("model.arch=hope", "model.cms.teach_signal=lm"), True, True,
     "CMS layers driven by the LM teach signal"),
    (("optim.levels=backbone.embed.*=4",), False, False, "optim.levels"),
    (("optim.name=muon",), False, False, "optim.name='muon'"),
    (("model.arch=hope", "data.sampling=stream", "train.state_reset=never"), False, True,
     "data.sampling='stream' and a hope model"),
])
def test_combinations_fsdp_cannot_run_are_refused(sets, teach, holds, named):
    config = tiny_config("corpus.txt", "out", *sets, FSDP)
    with pytest.raises(NestlearnError, match=r"train.parallel: got 'fsdp' with .*allowed: ") as err:
        check_sharding(config, TWO_RANKS, teach, holds)
    assert named in str(err.value)


def test_fsdp_allows_windows_for_memory_models_and_streams_for_the_transformer():
    for sets, holds in ((("model.arch=hope",), True), (("data.sampling=stream",), False)):
        check_sharding(tiny_config("corpus.txt", "out", *sets, FSDP), TWO_RANKS, False, holds)
