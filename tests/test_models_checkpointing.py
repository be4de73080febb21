"""Activation checkpointing over sequence segments (``ModelConfig.checkpoint_segment``)."""

import dataclasses
import json
import math

import pytest
import torch

from model_cases import random_ids, tiny_config, tiny_model
from nestlearn.errors import NestlearnError
from nestlearn.models import (
    ClassifierConfig,
    ModelConfig,
    build_classifier,
    from_pretrained,
    generate,
    save_pretrained,
)
from nestlearn.nn.teach_signal import stream_with_teach_signal
from nestlearn.state import tensors
from nestlearn.training.metrics_log import read_records
from trainkit import free_port, spawned_rank

CHECKPOINTED_ARCHS = ["hope", "hope-attention", "titans", "transformer", "titans-mag"]
# The tiny configs' chunks are 4 (memory), 3 (HOPE inner memories) and 2 / 6 (CMS): a
# segment of 5 tokens cuts inside all of them and does not divide the lengths used.
SEGMENT = 5


def _pair(arch, **overrides):
    """The same float64 model without and with checkpointing (same weights)."""
    plain = tiny_model(arch, **overrides)
    checkpointed = tiny_model(arch, checkpoint_segment=SEGMENT, **overrides)
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed


def _count_block_calls(model):
    """Calls of each block's forward (a recomputation in backward counts as a call)."""
    calls = [0] * len(model.backbone.blocks)
    for index, block in enumerate(model.backbone.blocks):
        def hook(module, args, index=index):
            calls[index] += 1
        block.register_forward_pre_hook(hook)
    return calls


def _assert_same_run(plain, checkpointed, ids, state_plain=None, state_checkpointed=None):
    """Logits, final state and every parameter gradient agree in float64."""
    logits_a, final_a = plain(ids, state_plain)
    logits_b, final_b = checkpointed(ids, state_checkpointed)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=1e-12)
    assert final_b.position == final_a.position
    assert final_b.fingerprint == final_a.fingerprint
    tensors_a, tensors_b = tensors(final_a), tensors(final_b)
    assert len(tensors_a) == len(tensors_b) > 0
    for a, b in zip(tensors_a, tensors_b, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    # The loss reads the final state too, so gradients through the carried states count.
    def loss(logits, final):
        return logits.square().mean() + sum(t.square().sum() for t in tensors(final)) * 1e-3

    params_a, params_b = list(plain.parameters()), list(checkpointed.parameters())
    grads_a = torch.autograd.grad(loss(logits_a, final_a), params_a, allow_unused=True)
    grads_b = torch.autograd.grad(loss(logits_b, final_b), params_b, allow_unused=True)
    compared = 0
    for (name, _), a, b in zip(plain.named_parameters(), grads_a, grads_b, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)
            compared += 1
    assert compared > 0


@pytest.mark.parametrize("arch", CHECKPOINTED_ARCHS)
def test_checkpointed_model_equals_one_pass(arch):
    plain, checkpointed = _pair(arch)
    calls = _count_block_calls(checkpointed)
    ids = random_ids(2, 23)
    _assert_same_run(plain, checkpointed, ids)
    # Really checkpointed: 5 segments, each block run once forward and once in backward.
    assert calls == [2 * math.ceil(23 / SEGMENT)] * len(calls)


@pytest.mark.parametrize("arch", CHECKPOINTED_ARCHS)
def test_boundary_states_hold_only_their_own_values(arch):
    # In one pass some state tensors are views of larger buffers (pending tokens sliced from
    # the input, a KV cache sliced from the fused q/k/v projection); kept at every segment
    # boundary they would keep those buffers alive, so the checkpointed pass stores copies.
    # Two segments of 11 tokens: each leaves a few pending tokens sliced from a longer buffer.
    # HOPE's main memory with self targets (its default) stores fresh per-chunk values, so
    # the v target keeps a sliced view in its state for this check to catch.
    memory = {"memory": {"memory_target": "v"}} if arch == "hope" else {}
    plain = tiny_model(arch, **memory)
    checkpointed = tiny_model(arch, checkpoint_segment=11, **memory)
    ids = random_ids(2, 22)

    def oversized(model):
        _, state = model(ids)
        return [tuple(t.shape) for t in tensors(state)
                if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size()]

    assert oversized(plain)  # the views exist, so the check below has something to catch
    assert oversized(checkpointed) == []


@pytest.mark.parametrize("arch", CHECKPOINTED_ARCHS)
def test_checkpointed_model_equals_one_pass_from_a_passed_state(arch):
    plain, checkpointed = _pair(arch)
    prefix = random_ids(2, 7, seed=2)
    # The state carries the prefix's graph: the gradients reach it through the state.
    _, state_plain = plain(prefix)
    _, state_checkpointed = checkpointed(prefix)
    _assert_same_run(plain, checkpointed, random_ids(2, 13), state_plain, state_checkpointed)


def test_lm_teach_signal_config_in_the_plain_forward_is_checkpointed_exactly():
    plain, checkpointed = _pair("hope", cms={"teach_signal": "lm", "chunk_sizes": (4, 8)})
    _assert_same_run(plain, checkpointed, random_ids(2, 17))


def test_without_gradients_nothing_changes():
    plain, checkpointed = _pair("hope")
    calls = _count_block_calls(checkpointed)
    ids = random_ids(2, 23)
    with torch.no_grad():
        logits_a, state_a = plain(ids)
        logits_b, state_b = checkpointed(ids)
    assert calls == [1] * len(calls)  # one unsegmented pass per block
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=0)
    for a, b in zip(tensors(state_a), tensors(state_b), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    prompt = random_ids(1, 9)
    torch.testing.assert_close(generate(checkpointed, prompt, 6, temperature=0),
                               generate(plain, prompt, 6, temperature=0))
    # The pass above, the prompt, then one call per new token but the last: no segments.
    assert calls[0] == 1 + 1 + 5


def test_lm_teach_signal_stream_is_unchanged():
    # The driver runs its own short segments; its gradients and updates stay the same.
    plain, checkpointed = _pair("hope", cms={"teach_signal": "lm", "chunk_sizes": (4, 8),
                                                  "inner_lr": 0.5})
    ids = random_ids(2, 14)
    outputs = []
    for model in (plain, checkpointed):
        logits, state = stream_with_teach_signal(model, ids[:, :-1], ids[:, 1:])
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()),
                                    allow_unused=True)
        outputs.append((logits, state, grads))
    (logits_a, state_a, grads_a), (logits_b, state_b, grads_b) = outputs
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=1e-12)
    for a, b in zip(tensors(state_a), tensors(state_b), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_classifier_backbone_is_checkpointed_exactly():
    torch.manual_seed(0)
    plain = build_classifier(ClassifierConfig(tiny_config("hope"), num_classes=3)).double()
    checkpointed = build_classifier(ClassifierConfig(
        tiny_config("hope", checkpoint_segment=SEGMENT), num_classes=3)).double()
    checkpointed.load_state_dict(plain.state_dict())
    calls = _count_block_calls(checkpointed)
    ids = random_ids(2, 11)
    logits_a, _ = plain(ids)
    logits_b, _ = checkpointed(ids)
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=1e-12)
    grads_a = torch.autograd.grad(logits_a.sum(), list(plain.parameters()), allow_unused=True)
    grads_b = torch.autograd.grad(logits_b.sum(), list(checkpointed.parameters()),
                                  allow_unused=True)
    compared = 0
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
            compared += 1
    assert compared > 0
    # 3 segments, each block run once forward and once in backward
    assert calls == [2 * math.ceil(11 / SEGMENT)] * len(calls)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "512"])
def test_bad_checkpoint_segment_is_refused_with_the_field_named(bad):
    with pytest.raises(NestlearnError, match="checkpoint_segment"):
        ModelConfig(checkpoint_segment=bad)


def test_config_round_trips_and_old_configs_load():
    config = tiny_config("hope", checkpoint_segment=512)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    old = config.to_dict()
    del old["checkpoint_segment"]  # a config saved before the field existed
    assert ModelConfig.from_dict(old).checkpoint_segment is None
    # Memory use only: the same fingerprint, so states pass between the two models.
    assert config.fingerprint() == ModelConfig.from_dict(old).fingerprint()
    assert config.fingerprint() != dataclasses.replace(config, dim=32).fingerprint()
    classifier = ClassifierConfig(config, num_classes=2)
    assert ClassifierConfig.from_dict(classifier.to_dict()) == classifier
    assert classifier.fingerprint() == ClassifierConfig(ModelConfig.from_dict(old), 2).fingerprint()


def test_state_passes_between_checkpointed_and_plain_models():
    plain, checkpointed = _pair("hope")
    ids = random_ids(2, 12)
    _, state = checkpointed(ids[:, :7])
    continued, _ = plain(ids[:, 7:], state)
    full, _ = plain(ids)
    torch.testing.assert_close(continued, full[:, 7:], rtol=0, atol=1e-12)


def test_save_and_load_keep_the_field(tmp_path):
    model = tiny_model("hope", checkpoint_segment=8)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.config.checkpoint_segment == 8
    assert loaded.config == model.config
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["config"]["checkpoint_segment"] == 8


def test_run_config_set_path():
    from nestlearn.training.recipes import get_recipe
    from nestlearn.training.runconfig import RunConfig, apply_overrides

    config = apply_overrides(get_recipe("tiny-transformer"), ["model.checkpoint_segment=512"])
    assert config.model.checkpoint_segment == 512
    assert RunConfig.from_dict(json.loads(config.to_json())).model.checkpoint_segment == 512
    old = json.loads(config.to_json())
    del old["model"]["checkpoint_segment"]  # a run folder's config.json from before the field
    assert RunConfig.from_dict(old).model.checkpoint_segment is None
    config = apply_overrides(config, ["model.checkpoint_segment=none"])
    assert config.model.checkpoint_segment is None
    with pytest.raises(NestlearnError, match="checkpoint_segment"):
        apply_overrides(config, ["model.checkpoint_segment=0"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from trainkit import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt", paragraphs=60)


def _train_losses(corpus, out, *sets):
    from nestlearn.training import train
    from trainkit import tiny_config as tiny_run

    config = tiny_run(corpus, out, "model.arch=hope", "train.steps=4", *sets)
    return list(train(config, progress=False).losses.values())


def test_training_with_checkpointing_gives_the_same_losses(corpus, tmp_path):
    plain = _train_losses(corpus, tmp_path / "plain")
    # seq_len 32 in segments of 12: cuts inside the memory and CMS chunks.
    checkpointed = _train_losses(corpus, tmp_path / "ckpt", "model.checkpoint_segment=12")
    assert len(plain) == len(checkpointed) == 4
    # float32: the segmented pass rounds differently (relative error ~1e-7 per op, a few
    # optimizer steps amplify it); any real difference would show at the 1e-2 level.
    assert checkpointed == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_ddp_ranks_with_checkpointing_agree_with_a_plain_single_process(corpus, tmp_path):
    import torch.multiprocessing as mp

    from trainkit import tiny_config as tiny_run

    plain = _train_losses(corpus, tmp_path / "single", "train.steps=3")
    ddp = tiny_run(corpus, tmp_path / "ddp", "model.arch=hope", "train.steps=3",
                   "model.checkpoint_segment=12")
    mp.spawn(spawned_rank, args=(2, free_port(), ddp.to_dict()), nprocs=2, join=True)
    losses = [r["loss"] for r in read_records(tmp_path / "ddp") if r["split"] == "train"]
    assert losses == pytest.approx(plain, rel=1e-5, abs=1e-5)


def test_bench_layers_runs_models_with_and_without_checkpointing(tmp_path, capsys):
    from nestlearn.cli import main

    code = main(["bench", "layers", "--sections", "models", "--archs", "hope", "--lengths", "16",
                 "--heads", "2", "--chunk-size", "4", "--cms-chunk-sizes", "4", "8",
                 "--model-dim", "16", "--model-layers", "1", "--checkpoint-segment", "off", "5",
                 "--repeats", "1", "--threads", "1", "--no-memory", "--out", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "layers-models.json").read_text())["rows"]
    assert [row["checkpoint segment"] for row in rows] == ["off", 5]
    assert all(row["tok/s"] > 0 and row["note"] == "" for row in rows)
    assert "| checkpoint segment |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "layers", "--checkpoint-segment", "0"])
    assert "--checkpoint-segment" in capsys.readouterr().err
