import pytest
import torch
import torch.nn.functional as F

import nestlearn
from model_cases import (
    ARCHS_WIRED,
    INITIAL_STATE_MARKERS,
    VOCAB,
    random_ids,
    tiny_config,
    tiny_model,
)
from nestlearn.errors import NestlearnError
from nestlearn.models import ARCHS, LMState, build_model, generate


@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_changing_a_future_token_never_changes_earlier_logits(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 12)
    logits, _ = model(ids)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(12 - t)) % VOCAB
        other, _ = model(changed)
        torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(other[:, t], logits[:, t])


@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_every_parameter_gets_a_gradient_including_initial_states(arch):
    model = tiny_model(arch)
    logits, _ = model(random_ids(2, 14))
    F.cross_entropy(logits.reshape(-1, VOCAB), random_ids(2, 14, seed=2).reshape(-1)).backward()
    names = [name for name, _ in model.named_parameters()]
    no_grad = [name for name, p in model.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    initial = [name for name in names if any(m in name for m in INITIAL_STATE_MARKERS)]
    assert bool(initial) == (arch != "transformer"), initial


@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_greedy_generate_with_state_equals_full_forward(arch):
    model = tiny_model(arch)
    prompt = random_ids(2, 5)
    out, step_logits = generate(model, prompt, 7, temperature=0, return_logits=True)
    assert out.shape == (2, 12)
    torch.testing.assert_close(out[:, :5], prompt)
    full, _ = model(out[:, :-1])
    torch.testing.assert_close(step_logits, full[:, 4:], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[:, 5:], full[:, 4:].argmax(-1))


@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_overfits_one_small_batch(arch):
    torch.manual_seed(0)
    # One block and chunks of 8 keep this fast.
    config = tiny_config(arch, chunk=8, dim=32, layers=1,
                         cms={"chunk_sizes": (8, 16)} if ARCHS[arch].cms else None)
    model = build_model(config)
    ids = random_ids(1, 17, seed=3)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)

    def loss_now() -> torch.Tensor:
        logits, _ = model(inputs)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    initial = loss_now().item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = loss_now()
        loss.backward()
        optimizer.step()
    final = loss_now().item()
    assert initial > 2.5  # about ln(17): chance
    assert final < 0.2, (initial, final)


@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_state_from_another_config_or_batch_is_refused(arch):
    model = tiny_model(arch)
    ids = random_ids(2, 4)
    _, state = model(ids)
    with pytest.raises(NestlearnError, match="batch size"):
        model(random_ids(3, 4), state)
    other = tiny_model(arch, dim=32)
    with pytest.raises(NestlearnError, match="another model config"):
        other(ids, state)
    with pytest.raises(NestlearnError, match="state"):
        model(ids, state.blocks)
    with pytest.raises(NestlearnError, match=r"state\.blocks"):
        model(ids, LMState(state.blocks[:1], state.position, 2, state.fingerprint))


def test_bad_ids_are_refused_with_the_argument_named():
    model = tiny_model("transformer")
    with pytest.raises(NestlearnError, match=r"ids\.dtype"):
        model(torch.zeros(2, 3))
    with pytest.raises(NestlearnError, match=r"ids\.dtype"):
        model(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(NestlearnError, match=r"ids\.shape"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(NestlearnError, match="T >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long))
    # the range is read on the host (a device sync): checked under the debug switch only
    with nestlearn.debug_checks():
        with pytest.raises(NestlearnError, match=r"values in \[0, 16\]"):
            model(torch.tensor([[1, VOCAB]]))
        with pytest.raises(NestlearnError, match="ids"):
            model(torch.tensor([[-1, 2]]))
    # without it, the embedding lookup fails and the error is reported by name all the same
    with pytest.raises(NestlearnError, match=r"values in \[0, 16\]"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(NestlearnError, match=r"values in \[-1, 2\]"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(NestlearnError, match="ids"):
        model([[1, 2]])


def test_state_detach_cuts_the_graph():
    model = tiny_model("transformer")
    _, state = model(random_ids(1, 4))
    assert state.blocks[0].key.requires_grad
    detached = state.detach()
    assert not detached.blocks[0].key.requires_grad
    assert detached.position == 4 and detached.fingerprint == state.fingerprint
    torch.testing.assert_close(detached.blocks[1].value, state.blocks[1].value)


def test_untied_head_and_sliding_window_transformer():
    model = tiny_model("transformer", tie_embeddings=False, attention={"window": 3})
    assert model.head is not None
    ids = random_ids(1, 9)
    full, _ = model(ids)
    pieces, state = [], None
    for t in range(9):
        logits, state = model(ids[:, t:t + 1], state)
        pieces.append(logits)
        assert state.blocks[0].key.shape[2] <= 2
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ["titans", "titans-mag"])
def test_persistent_tokens_stream_exactly_and_learn(arch):
    model = tiny_model(arch, memory={"persistent_tokens": 3})
    ids = random_ids(2, 11)
    full, _ = model(ids)
    first, state = model(ids[:, :4])
    second, _ = model(ids[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, rtol=0, atol=1e-10)
    full.square().mean().backward()
    persistent = [p for name, p in model.named_parameters() if name.endswith("persistent")]
    assert len(persistent) == 2 and all(p.grad.abs().sum() > 0 for p in persistent)


def test_embedding_lookup_by_index_select_matches_torch_embedding():
    # embed_ids looks a plain embedding up with index_select (a sync-free backward on CUDA)
    from nestlearn.models.lm import embed_ids

    torch.manual_seed(0)
    ids = torch.randint(0, 11, (3, 17))  # repeated ids: their gradients add up
    for options in ({}, {"padding_idx": 0}):
        embed = torch.nn.Embedding(11, 5, dtype=torch.float64, **options)
        reference = F.embedding(ids, embed.weight, **options)
        (grad_reference,) = torch.autograd.grad(reference.square().sum(), embed.weight)
        looked_up = embed_ids(embed, ids)
        (grad,) = torch.autograd.grad(looked_up.square().sum(), embed.weight)
        torch.testing.assert_close(looked_up, reference, rtol=0, atol=0)
        torch.testing.assert_close(grad, grad_reference, rtol=1e-14, atol=1e-14)
    with pytest.raises(NestlearnError, match="ids"):
        embed_ids(torch.nn.Embedding(11, 5), torch.tensor([[3, 11]]))
