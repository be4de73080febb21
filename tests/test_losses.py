import pytest
import torch
import torch.nn.functional as F

from nestlearn.data import IGNORE_INDEX as DATA_IGNORE_INDEX
from nestlearn.losses import IGNORE_INDEX, lm_loss_sum, scored_targets


def _batch(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=dtype)
    targets = torch.randint(0, 11, (3, 5), generator=generator)
    targets[0, 3:] = IGNORE_INDEX
    targets[2, 4] = IGNORE_INDEX
    return logits, targets


def test_the_ignore_index_is_cross_entropys_default_and_the_datas():
    assert IGNORE_INDEX == -100 == DATA_IGNORE_INDEX
    logits, targets = _batch()
    flat = logits.reshape(-1, 11), targets.reshape(-1)
    assert torch.equal(F.cross_entropy(*flat, reduction="sum"),
                       F.cross_entropy(*flat, ignore_index=IGNORE_INDEX, reduction="sum"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lm_loss_sum_is_cross_entropy_summed_over_scored_targets(dtype):
    logits, targets = _batch(dtype)
    expected = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    got = lm_loss_sum(logits, targets)
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    scored = targets != IGNORE_INDEX
    by_hand = -torch.log_softmax(logits, -1)[scored].gather(-1, targets[scored][:, None]).sum()
    torch.testing.assert_close(got, by_hand)
    assert int(scored_targets(targets)) == int(scored.sum()) == 12


def test_half_precision_logits_are_scored_in_float32():
    logits, targets = _batch()
    got = lm_loss_sum(logits.bfloat16(), targets)
    assert got.dtype == torch.float32
    assert torch.equal(got, lm_loss_sum(logits.bfloat16().float(), targets))
