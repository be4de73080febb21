import pytest
import torch
import torch.nn.functional as F

from model_cases import ARCHS_WIRED, random_ids, tiny_config
from nestlearn.errors import NestlearnError
from nestlearn.models import ClassifierConfig, build_classifier


def _classifier(arch: str, pooling: str):
    torch.manual_seed(0)
    return build_classifier(ClassifierConfig(tiny_config(arch), 3, pooling)).double()


@pytest.mark.parametrize("arch", ARCHS_WIRED)
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padding_after_a_row_does_not_change_its_logits(arch, pooling):
    model = _classifier(arch, pooling)
    ids = random_ids(2, 9)
    lengths = torch.tensor([5, 9])
    logits, _ = model(ids, lengths=lengths)
    alone, _ = model(ids[:1, :5])
    torch.testing.assert_close(logits[:1], alone, rtol=0, atol=1e-10)
    hidden, _ = model.backbone(ids)
    pooled = hidden[1, -1] if pooling == "last" else hidden[1].mean(0)
    torch.testing.assert_close(logits[1], model.head(pooled))


@pytest.mark.parametrize("arch", ARCHS_WIRED)
def test_classifier_learns_a_small_batch(arch):
    torch.manual_seed(0)
    backbone = tiny_config(arch, chunk=8, layers=1)
    model = build_classifier(ClassifierConfig(backbone, 3, "mean"))
    ids = random_ids(6, 8, seed=4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(ids)[0], labels)
        loss.backward()
        optimizer.step()
    assert (model(ids)[0].argmax(-1) == labels).all()


def test_bad_lengths_are_refused():
    model = _classifier("transformer", "mean")
    ids = random_ids(2, 4)
    with pytest.raises(NestlearnError, match="lengths"):
        model(ids, lengths=torch.tensor([0, 4]))
    with pytest.raises(NestlearnError, match="lengths"):
        model(ids, lengths=torch.tensor([4]))
    with pytest.raises(NestlearnError, match="lengths"):
        model(ids, lengths=torch.tensor([2.0, 4.0]))
