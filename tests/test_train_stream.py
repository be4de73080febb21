"""Stream training: the carried state and its row resets, bitwise resume with the carried
state in the checkpoint, the NaN guard on it, DDP, and the LM teach signal in training."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from nestlearn.errors import NestlearnError
from nestlearn.losses import lm_loss_sum
from nestlearn.models import ModelConfig, build_model
from nestlearn.nn.cms import ContinuumMemoryState, unfinished_gradient
from nestlearn.nn.teach_signal import stream_with_teach_signal
from nestlearn.state import detach, named_tensors
from nestlearn.training import NonFiniteError, Trainer, train
from nestlearn.training import checkpoint as ckpt
from nestlearn.training.carried_state import (
    carried_form,
    drop_attention_caches,
    reset_rows,
    state_to_tree,
    tree_from_state_tree,
)
from nestlearn.training.metrics_log import read_records
from nestlearn.training.runconfig import TrainConfig
from trainkit import single_and_gloo_rows, tiny_config, write_corpus

STREAM = ("data.sampling=stream", "data.seq_len=64", "optim.lr=0.01")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "verse.txt", paragraphs=120)


def _losses(run_dir):
    return [r["loss"] for r in read_records(run_dir) if r["split"] == "train"]


def _model(arch, dtype=torch.float64, **fields):
    config = ModelConfig(arch=arch, vocab_size=32, dim=16, layers=2, heads=2, **fields)
    torch.manual_seed(0)
    return build_model(config).to(dtype)


@pytest.mark.parametrize("arch", ["titans", "hope"])
def test_reset_rows_gives_reset_rows_the_fresh_state_and_keeps_the_others(arch):
    model = _model(arch)
    ids = torch.randint(0, 32, (3, 64))
    _, carried = model(ids)
    carried = detach(carried)
    reset = torch.tensor([False, True, False])
    state = reset_rows(carried, model.init_state, reset)
    fresh = named_tensors(model.init_state(3))
    for name, tensor in named_tensors(state).items():
        before = named_tensors(carried)[name]
        assert torch.equal(tensor[[0, 2]], before[[0, 2]]), name
        want = fresh.get(name)
        want = torch.zeros_like(tensor[1]) if want is None else want.expand_as(tensor)[1]
        assert torch.equal(tensor[1], want), name
    # the reset row computes what a fresh stream computes (float64), the others continue
    nxt = torch.randint(0, 32, (3, 64))
    logits, _ = model(nxt, state)
    alone, _ = model(nxt[1:2])
    torch.testing.assert_close(logits[1:2], alone, rtol=0, atol=1e-10)
    kept, _ = model(nxt, carried)
    torch.testing.assert_close(logits[[0, 2]], kept[[0, 2]], rtol=0, atol=1e-10)


def test_initial_weights_get_gradients_from_rows_that_were_not_reset():
    model = _model("titans")
    _, carried = model(torch.randint(0, 32, (2, 64)))
    state = reset_rows(detach(carried), model.init_state, torch.tensor([False, False]))
    logits, _ = model(torch.randint(0, 32, (2, 64)), state)
    logits.sum().backward()
    initial = model.backbone.blocks[0].memory.memory_weights[0]
    assert initial.grad is not None and initial.grad.abs().sum() > 0


def test_reset_refuses_pending_tokens_a_row_cannot_drop():
    model = _model("titans", memory={"chunk_size": 64})
    _, carried = model(torch.randint(0, 32, (2, 40)))  # 40 of a 64-token memory chunk
    with pytest.raises(NestlearnError, match=r"memory\.keys: carried shape \(2, 40"):
        reset_rows(detach(carried), model.init_state, torch.tensor([True, False]))


def test_attention_caches_are_not_carried_and_states_round_trip():
    model = _model("hope-attention")
    _, state = model(torch.randint(0, 32, (2, 16)))
    dropped = drop_attention_caches(detach(state))
    cache = dropped.blocks[0].attention
    assert cache.key.shape[2] == 0 and cache.position == 16
    back = tree_from_state_tree(state_to_tree(dropped))
    assert type(back) is type(dropped) and back.position == dropped.position
    assert back.blocks[0].cms.config == dropped.blocks[0].cms.config
    a, b = named_tensors(dropped), named_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(NestlearnError, match="refused; allowed: nestlearn's"):
        tree_from_state_tree({"__class__": "os:system", "fields": {}})


def test_a_state_saved_without_a_later_field_rebuilds_with_its_default():
    # CMS levels gained ``pending`` (tokens whose gradients wait for their chunk's end); a
    # carried state saved before it has no such field and rebuilds with None (nothing held)
    model = _model("hope", cms={"chunk_sizes": (4, 8)})
    _, state = model(torch.randint(0, 32, (2, 16)))  # every CMS chunk complete: none held
    tree = state_to_tree(detach(state))

    def drop_pending(node):
        if isinstance(node, dict):
            node = {key: drop_pending(value) for key, value in node.items()}
            if str(node.get("__class__", "")).endswith("CMSLevelState"):
                assert node["fields"].pop("pending") is None
            return node
        if isinstance(node, (list, tuple)):
            return type(node)(drop_pending(value) for value in node)
        return node

    back = tree_from_state_tree(drop_pending(tree))
    levels = [level for block in back.blocks for level in block.cms.levels]
    assert levels and all(level.pending is None for level in levels)
    a, b = named_tensors(detach(state)), named_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_state_reset_option_is_validated(corpus, tmp_path):
    for bad in ("every", "every:0", "sometimes", "every:x"):
        with pytest.raises(NestlearnError, match=r"train\.state_reset"):
            TrainConfig(state_reset=bad)
    assert TrainConfig(state_reset="every:3").state_reset == "every:3"
    config = tiny_config(corpus, tmp_path / "run", "train.state_reset=never")
    with pytest.raises(NestlearnError, match=r"train\.state_reset: got 'never'; allowed: the "
                                             r"default 'document' with data\.sampling="):
        Trainer(config, progress=False)
    config = tiny_config(corpus, tmp_path / "run2", "model.arch=titans", "data.sampling=stream",
                         "model.memory.chunk_size=64")
    with pytest.raises(NestlearnError, match=r"data\.seq_len a multiple of every memory chunk"):
        Trainer(config, progress=False)  # seq_len 32, memory chunks of 64


def _record_inputs(trainer):
    """Keep each step's (incoming state, returned state) of the trainer's model."""
    seen = []
    forward = trainer.model.forward

    def spy(ids, state=None, **kwargs):
        logits, new_state = forward(ids, state, **kwargs)
        initial = trainer.model.backbone.blocks[0].memory.memory_weights[0]
        seen.append((state, new_state, initial.detach().clone()))
        return logits, new_state

    trainer.model.forward = spy
    return seen


@pytest.mark.parametrize("policy", ["document", pytest.param("never", marks=pytest.mark.slow),
                                    pytest.param("every:2", marks=pytest.mark.slow)])
def test_stream_training_carries_the_state_and_resets_rows_by_policy(corpus, tmp_path, policy):
    config = tiny_config(corpus, tmp_path / "run", "model.arch=titans", *STREAM,
                         "train.steps=5", f"train.state_reset={policy}")
    trainer = Trainer(config, progress=False)
    seen = _record_inputs(trainer)
    flags = []
    next_batch = trainer.sampler.next_batch

    def spy_batch():
        batch = next_batch()
        flags.append(batch.new_document)
        return batch

    trainer.sampler.next_batch = spy_batch
    trainer.run()
    assert seen[0][0] is None  # the first segment starts fresh
    name = "state.blocks[0].memory.chunk_start.weights[0]"
    for step in range(1, 5):
        incoming = named_tensors(seen[step][0])[name]
        carried = named_tensors(seen[step - 1][1])[name]
        initial = seen[step][2]  # the initial weights when this step ran
        if policy == "document":
            reset = flags[step]
        elif policy == "never":
            reset = torch.zeros(4, dtype=torch.bool)
        else:
            reset = torch.full((4,), step % 2 == 0)
        for row in range(4):
            want = initial if reset[row] else carried[row].detach()
            assert torch.equal(incoming[row].detach(), want), (step, row)
    assert policy != "document" or any(bool(f.any()) for f in flags[1:])


@pytest.mark.parametrize("arch", ["titans", pytest.param("hope", marks=pytest.mark.slow)])
def test_stream_resume_equals_an_uninterrupted_run_bitwise(corpus, tmp_path, arch):
    extra = (f"model.arch={arch}", *STREAM, "train.steps=8", "train.eval_every=4")
    straight = tmp_path / "straight"
    train(tiny_config(corpus, straight, *extra), progress=False)
    resumed = tmp_path / "resumed"
    config = tiny_config(corpus, resumed, *extra)
    assert train(config, progress=False, stop_at=3).step == 3
    saved = ckpt.load_checkpoint(resumed)
    assert isinstance(saved.carried, list) and len(saved.carried) == 1
    assert saved.carried[0] is not None and saved.sampler["kind"] == "stream"
    second = train(config, resume=True, progress=False)
    assert second.status == "completed"
    assert _losses(resumed) == _losses(straight)  # exact float equality
    a = ckpt.load_checkpoint(straight)
    b = ckpt.load_checkpoint(resumed)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    sa = named_tensors(tree_from_state_tree(a.carried[0]))
    sb = named_tensors(tree_from_state_tree(b.carried[0]))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stream_nan_in_carried_state_stops_and_resumes(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "model.arch=titans", *STREAM,
                         "train.steps=6")
    trainer = Trainer(config, progress=False)
    forward = trainer.model.forward

    def poisoned(ids, state=None):
        logits, new_state = forward(ids, state)
        if trainer.step + 1 == 4:
            memory = new_state.blocks[1]
            bad = memory.conv_tail * float("nan")
            blocks = (new_state.blocks[0], dataclasses.replace(memory, conv_tail=bad))
            new_state = dataclasses.replace(new_state, blocks=blocks)
        return logits, new_state

    trainer.model.forward = poisoned
    with pytest.raises(NonFiniteError, match=r"step 4: NaN/Inf in memory state\.blocks\[1\]"):
        trainer.run()
    before = _losses(tmp_path / "run")
    resumed = Trainer(config, resume=True, progress=False)
    assert resumed.step == 3 and resumed.carried is not None
    resumed.run()
    straight = tmp_path / "straight"
    train(tiny_config(corpus, straight, "model.arch=titans", *STREAM, "train.steps=6"),
          progress=False)
    assert _losses(tmp_path / "run") == _losses(straight) and before == _losses(straight)[:3]


def test_stream_checkpoint_refuses_another_number_of_processes(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "model.arch=titans", *STREAM,
                         "train.steps=4")
    train(config, progress=False, stop_at=2)
    path = ckpt.latest_checkpoint(tmp_path / "run")
    saved = ckpt.load_checkpoint(path)
    trainer = Trainer(config, resume=True, progress=False)
    trainer.lock.release()
    trainer.ctx = dataclasses.replace(trainer.ctx, world_size=2)
    with pytest.raises(NestlearnError, match="holds 1 carried stream states; allowed: one per "
                                             "process"):
        trainer._restored_carried(saved)


def test_lm_teach_signal_drives_the_levels_in_training(corpus, tmp_path):
    sets = ("model.arch=hope", "model.cms.teach_signal=lm", "model.cms.chunk_sizes=[8, 16]",
            "model.cms.inner_lr=0.05", "data.seq_len=64", "train.steps=2")
    config = tiny_config(corpus, tmp_path / "run", *sets)
    trainer = Trainer(config, progress=False)
    assert trainer.teach_signal
    start = copy.deepcopy(trainer.model)
    probe = trainer._make_sampler()
    inputs, targets = probe.next_batch()
    record = trainer.train_step()
    # the loss is the driver's, run by hand on the same batch from the same weights
    logits, state = stream_with_teach_signal(start, inputs, targets)
    by_hand = lm_loss_sum(logits, targets).item() / int((targets != -100).sum())
    assert math.isclose(record.loss, by_hand, rel_tol=1e-6)
    # ... which is not the loss of the model with its levels frozen
    plain, _ = start(inputs)
    frozen = lm_loss_sum(plain, targets).item() / int((targets != -100).sum())
    assert not math.isclose(record.loss, frozen, rel_tol=1e-6)
    levels = [c for c in _cms_states(state)]
    assert levels and all(level.levels[0].weights[0].dim() == 3 for level in levels)


def _cms_states(state):
    from nestlearn.state import instances

    return instances(state, ContinuumMemoryState)


@pytest.mark.slow
def test_lm_teach_signal_levels_are_carried_in_stream_training(corpus, tmp_path):
    sets = ("model.arch=hope", "model.cms.teach_signal=lm", "model.cms.chunk_sizes=[8, 16]",
            "model.cms.inner_lr=0.05", *STREAM, "train.steps=2", "train.state_reset=never")
    trainer = Trainer(tiny_config(corpus, tmp_path / "run", *sets), progress=False)
    trainer.run()
    levels = _cms_states(trainer.carried)
    assert levels and all(c.position == 128 for c in levels)
    initial = trainer.model.backbone.blocks[0].cms
    fresh = initial.init_state(4).levels[0].weights[0]
    moved = levels[0].levels[0].weights[0]
    assert moved.shape[0] == 4 and not torch.equal(moved, fresh.expand_as(moved))


@pytest.mark.slow
def test_gloo_stream_ranks_agree_with_a_single_process(tmp_path):
    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=40)
    rows = single_and_gloo_rows(corpus, tmp_path, "model.arch=titans", *STREAM,
                                "train.steps=3", "data.batch_size=4")
    assert [r["tokens"] for r in rows["ddp"]] == [r["tokens"] for r in rows["single"]]
    assert [r["loss"] for r in rows["ddp"]] == pytest.approx(
        [r["loss"] for r in rows["single"]], rel=1e-5, abs=1e-5)
    saved = ckpt.load_checkpoint(tmp_path / "ddp")
    assert len(saved.carried) == 2  # one carried state per rank
    whole = named_tensors(tree_from_state_tree(ckpt.load_checkpoint(tmp_path / "single")
                                               .carried[0]))
    halves = [named_tensors(tree_from_state_tree(part)) for part in saved.carried]
    for name, tensor in whole.items():
        torch.testing.assert_close(torch.cat([h[name] for h in halves]), tensor,
                                   rtol=1e-4, atol=1e-5, msg=name)


def test_a_checkpoint_written_before_the_stream_fields_resumes(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", "train.steps=4")
    train(config, progress=False, stop_at=2)
    manifest_path = ckpt.latest_checkpoint(tmp_path / "run") / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    payload = manifest["payload"]
    del payload["config"]["data"]["sampling"], payload["config"]["train"]["state_reset"]
    manifest["payload_sha256"] = ckpt._payload_digest(payload)
    manifest_path.write_text(json.dumps(manifest))
    assert train(config, resume=True, progress=False).step == 4


@pytest.mark.slow
def test_gloo_lm_teach_signal_ranks_agree_with_a_single_process(tmp_path):
    corpus = write_corpus(tmp_path / "verse.txt", paragraphs=40)
    rows = single_and_gloo_rows(corpus, tmp_path, "model.arch=hope", "model.cms.teach_signal=lm",
                                "model.cms.chunk_sizes=[8, 16]", "model.cms.inner_lr=0.05",
                                *STREAM, "train.steps=3", "data.batch_size=4")
    assert [r["loss"] for r in rows["ddp"]] == pytest.approx(
        [r["loss"] for r in rows["single"]], rel=1e-5, abs=1e-5)
    a = ckpt.load_checkpoint(tmp_path / "single").model
    b = ckpt.load_checkpoint(tmp_path / "ddp").model
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["hope-attention",
                                  pytest.param("titans-mag", marks=pytest.mark.slow)])
def test_attention_archs_train_in_stream_mode_with_memories_carried(corpus, tmp_path, arch):
    # hope-attention's slower CMS level (chunk 256) ends no chunk in these two segments
    window = ["model.attention.window=16"] if arch == "titans-mag" else [
        "model.cms.chunk_sizes=16,256"]
    config = tiny_config(corpus, tmp_path / "run", f"model.arch={arch}", *window, *STREAM,
                         "train.steps=2")
    trainer = Trainer(config, progress=False)
    result = trainer.run()
    assert result.step == 2 and all(math.isfinite(x) for x in result.losses.values())
    caches = [t for name, t in named_tensors(trainer.carried).items() if "attention" in name]
    assert caches and all(t.shape[2] == 0 for t in caches)  # KV caches are not carried
    memories = [name for name in named_tensors(trainer.carried) if "attention" not in name]
    assert memories  # the CMS levels / neural memory are
    # the held tokens are carried as their gradient sum (carried_form)
    assert not [name for name in memories if "pending" in name]
    assert arch != "hope-attention" or [name for name in memories if "accumulator" in name]


def test_carried_form_settles_the_cms_levels_held_tokens():
    # What a stream carries past an optimizer step: a held token's gradient taken with the
    # weights and parameters that saw it (a running sum), detached, as before levels held tokens
    model = _model("hope", cms={"chunk_sizes": (4, 32)})
    _, state = model(torch.randint(0, 32, (2, 12)))  # the chunk-32 levels hold 12 tokens
    carried = carried_form(state)
    held = 0
    for block, kept in zip(state.blocks, carried.blocks, strict=True):
        for index, (level, settled) in enumerate(zip(block.cms.levels, kept.cms.levels,
                                                     strict=True)):
            held += level.pending is not None
            assert settled.pending is None
            want = unfinished_gradient(block.cms.config, index, level)
            if want is None:
                assert settled.accumulator is None
                continue
            for got, expected in zip(settled.accumulator, want, strict=True):
                assert not got.requires_grad
                torch.testing.assert_close(got, expected.detach(), rtol=1e-12, atol=1e-14)
    assert held == 2  # one level per block


def test_titans_recipes_train_in_stream_mode_by_default(corpus, tmp_path):
    from nestlearn.training.recipes import get_recipe
    from nestlearn.training.runconfig import apply_overrides

    for scale in ("tiny", "small", "base"):
        assert get_recipe(f"{scale}-titans").data.sampling == "stream"
        assert get_recipe(f"{scale}-transformer").data.sampling == "windows"
    config = apply_overrides(get_recipe("tiny-titans"), [
        f"data.corpus={corpus}", f"train.out_dir={tmp_path / 'run'}", "train.steps=1",
        "data.batch_size=4", "train.eval_iters=1", "train.device=cpu"])
    assert train(config, progress=False).step == 1
