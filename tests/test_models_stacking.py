import pytest
import torch
import torch.nn.functional as F

from model_cases import VOCAB, random_ids, tiny_model
from nestlearn.errors import NestlearnError
from nestlearn.models import generate
from nestlearn.models.stacking import hope_from_transformer


def _trained_transformer(**overrides):
    """A Transformer nudged away from its initialization, so every weight matters."""
    model = tiny_model("transformer", **overrides)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = random_ids(2, 12, seed=7)
    for _ in range(3):
        optimizer.zero_grad()
        logits, _ = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("chunks", [(4,), (2, 6), (2, 3, 8)])
@pytest.mark.parametrize("variant", ["sequential", "independent"])
@pytest.mark.parametrize("tied", [True, False])
def test_zero_inner_rates_give_exactly_the_transformer_logits(chunks, variant, tied):
    source = _trained_transformer(tie_embeddings=tied)
    stacked = hope_from_transformer(source, cms_chunk_sizes=chunks, cms={"variant": variant})
    assert stacked.config.arch == "hope-attention"
    assert next(stacked.parameters()).dtype == torch.float64
    ids = random_ids(2, 19)
    expected, _ = source(ids)
    got, _ = stacked(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    prompt = ids[:, :5]
    torch.testing.assert_close(generate(stacked, prompt, 6, temperature=0),
                               generate(source, prompt, 6, temperature=0))


@pytest.mark.parametrize("level", [0, 1])
def test_positive_rates_leave_logits_equal_until_the_first_update(level):
    source = _trained_transformer()
    stacked = hope_from_transformer(source, cms_chunk_sizes=(4, 8), mlp_level=level,
                                    cms_inner_lr=0.5)
    ids = random_ids(2, 12)
    expected, _ = source(ids)
    got, _ = stacked(ids)
    # No level changes before position 4 (the fastest level's first boundary).
    torch.testing.assert_close(got[:, :4], expected[:, :4], rtol=0, atol=1e-12)
    assert not torch.allclose(got[:, 4:], expected[:, 4:])


def test_stacked_model_keeps_training():
    stacked = hope_from_transformer(_trained_transformer(), cms_chunk_sizes=(2, 6))
    ids = random_ids(2, 10)
    logits, _ = stacked(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    fresh_level = stacked.backbone.blocks[0].cms.initial[0]
    assert fresh_level.w_down.grad.abs().sum() > 0  # the zero-output level starts learning


def test_hope_arch_carries_over_embedding_and_mlps():
    source = _trained_transformer()
    stacked = hope_from_transformer(source, arch="hope", cms_chunk_sizes=(2, 6))
    assert stacked.config.arch == "hope"
    torch.testing.assert_close(stacked.backbone.embed.weight, source.backbone.embed.weight)
    for new, old in zip(stacked.backbone.blocks, source.backbone.blocks, strict=True):
        level = new.cms.initial[1]
        torch.testing.assert_close(level.w_gate, old.mlp.gate.weight)
        torch.testing.assert_close(level.w_up, old.mlp.up.weight)
        torch.testing.assert_close(level.w_down, old.mlp.down.weight)
        assert not new.cms.initial[0].w_down.any()
    logits, _ = stacked(random_ids(1, 7))
    assert torch.isfinite(logits).all()


def test_bad_stacking_requests_are_refused():
    source = tiny_model("transformer")
    with pytest.raises(NestlearnError, match="transformer_model"):
        hope_from_transformer(tiny_model("titans"))
    with pytest.raises(NestlearnError, match="arch"):
        hope_from_transformer(source, arch="titans")
    with pytest.raises(NestlearnError, match="mlp_level"):
        hope_from_transformer(source, cms_chunk_sizes=(2, 4), mlp_level=2)
    with pytest.raises(NestlearnError, match=r"cms\.variant"):
        hope_from_transformer(source, cms_chunk_sizes=(2, 4), cms={"variant": "nested"})
    with pytest.raises(NestlearnError, match="config_overrides"):
        hope_from_transformer(source, cms={"mlp": "gelu"})
    with pytest.raises(NestlearnError, match="window"):
        hope_from_transformer(tiny_model("transformer", attention={"window": 3}))
