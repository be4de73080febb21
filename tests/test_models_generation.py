import pytest
import torch

from model_cases import random_ids, tiny_model
from nestlearn.errors import NestlearnError
from nestlearn.models import generate, sample_next
from nestlearn.state import tensors


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = tiny_model("transformer")
    prompt = random_ids(2, 3)
    a = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    greedy = generate(model, prompt, 6, temperature=0)
    top1 = generate(model, prompt, 6, temperature=0.7, top_k=1)
    torch.testing.assert_close(top1, greedy)


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]]).repeat(200, 1)
    tokens = sample_next(logits, temperature=5.0, top_k=2,
                         generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 2}


def test_generate_continues_a_stream_with_its_state():
    model = tiny_model("transformer")
    ids = random_ids(1, 8)
    whole = generate(model, ids, 4, temperature=0)
    _, state = model(ids[:, :5])
    continued = generate(model, ids[:, 5:], 4, temperature=0, state=state)
    torch.testing.assert_close(continued, whole[:, 5:])


def test_zero_new_tokens_returns_the_prompt():
    model = tiny_model("transformer")
    ids = random_ids(2, 3)
    out, logits = generate(model, ids, 0, return_logits=True)
    torch.testing.assert_close(out, ids)
    assert logits.shape == (2, 0, 17)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"max_new_tokens": 2, "temperature": -0.5}, "temperature"),
    ({"max_new_tokens": 2, "top_k": 0}, "top_k"),
    ({"max_new_tokens": 2, "top_k": 18}, "top_k"),
    ({"max_new_tokens": 2, "generator": 3}, "generator"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(NestlearnError, match=message):
        generate(tiny_model("transformer"), random_ids(1, 2), **kwargs)


def _state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(state))


@pytest.mark.parametrize(("arch", "grows"), [
    ("transformer", True), ("hope-attention", True),
    ("titans", False), ("titans-mag", False), ("hope", False),
])
def test_recurrent_state_does_not_grow_with_the_context(arch, grows):
    model = tiny_model(arch)
    ids = random_ids(1, 48)
    # 24 and 48 are multiples of every chunk size of the tiny configs (4, 3, 2, 6).
    _, short = model(ids[:, :24])
    _, long = model(ids)
    assert (_state_bytes(long) > _state_bytes(short)) == grows
    if not grows:
        assert _state_bytes(long) == _state_bytes(short)
