import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_cases import ARCHS_WIRED, random_ids, tiny_config, tiny_model
from nestlearn.atomic import sha256_file
from nestlearn.errors import NestlearnError
from nestlearn.models import (
    ClassifierConfig,
    build_classifier,
    from_pretrained,
    save_pretrained,
)
from nestlearn.models.io import CONFIG_FILE, WEIGHTS_FILE


@pytest.mark.parametrize("arch", ARCHS_WIRED)
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, arch, tied):
    model = tiny_model(arch, tie_embeddings=tied)
    path = save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = from_pretrained(path)
    assert loaded.config == model.config
    assert next(loaded.parameters()).dtype == torch.float64
    ids = random_ids(2, 6)
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_save_replaces_a_checkpoint_and_leaves_no_temporary_files(tmp_path):
    first, second = tiny_model("transformer", seed=0), tiny_model("transformer", seed=1)
    save_pretrained(first, tmp_path / "ckpt")
    save_pretrained(second, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    ids = random_ids(1, 5)
    torch.testing.assert_close(from_pretrained(tmp_path / "ckpt")(ids)[0], second(ids)[0])


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(NestlearnError, match="directory"):
        save_pretrained(tiny_model("transformer"), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(tiny_config("transformer"), 3, "last"))
    loaded = from_pretrained(save_pretrained(model, tmp_path / "clf"))
    ids = random_ids(2, 5)
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def _rewrite_weights(path, change):
    """Apply ``change`` to the tensors and record the new checksum (a consistent checkpoint)."""
    tensors = load_file(str(path / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["sha256"] = sha256_file(path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(meta))


def test_tampered_weights_fail_the_checksum(tmp_path):
    path = save_pretrained(tiny_model("transformer"), tmp_path / "ckpt")
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(NestlearnError, match="SHA-256"):
        from_pretrained(path)


def test_missing_extra_and_mismatched_tensors_are_named(tmp_path):
    path = save_pretrained(tiny_model("transformer"), tmp_path / "ckpt")
    _rewrite_weights(path, lambda t: t.pop("backbone.norm.weight"))
    with pytest.raises(NestlearnError, match=r"missing tensors \['backbone.norm.weight'\]"):
        from_pretrained(path)

    path = save_pretrained(tiny_model("transformer"), tmp_path / "ckpt2")
    _rewrite_weights(path, lambda t: t.update(stray=torch.zeros(2)))
    with pytest.raises(NestlearnError, match=r"unexpected tensors \['stray'\]"):
        from_pretrained(path)

    path = save_pretrained(tiny_model("transformer"), tmp_path / "ckpt3")
    _rewrite_weights(path, lambda t: t.update({"backbone.norm.weight": torch.ones(5)}))
    with pytest.raises(NestlearnError, match=r"backbone.norm.weight: saved \(5,\), model \(16,\)"):
        from_pretrained(path)


def test_missing_files_and_bad_configs_are_refused(tmp_path):
    with pytest.raises(NestlearnError, match="directory"):
        from_pretrained(tmp_path / "nothing")
    path = save_pretrained(tiny_model("transformer"), tmp_path / "ckpt")
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(NestlearnError, match=WEIGHTS_FILE):
        from_pretrained(path)
    path = save_pretrained(tiny_model("transformer"), tmp_path / "ckpt2")
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["config"]["dimension"] = 3
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(NestlearnError, match="dimension"):
        from_pretrained(path)
