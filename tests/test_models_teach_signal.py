import pytest
import torch

from model_cases import random_ids, tiny_model
from nestlearn.nn.teach_signal import stream_with_teach_signal


@pytest.mark.parametrize("arch", ["hope", "hope-attention"])
def test_lm_teach_signal_drives_the_cms_levels_of_a_model(arch):
    model = tiny_model(arch, cms={"teach_signal": "lm", "chunk_sizes": (4, 8), "inner_lr": 0.5})
    ids = random_ids(2, 13)
    frozen, _ = model(ids[:, :-1])
    with torch.no_grad():
        driven, state = stream_with_teach_signal(model, ids[:, :-1], ids[:, 1:])
    # No level has changed before position 4; afterwards the LM-driven updates show.
    torch.testing.assert_close(driven[:, :4], frozen[:, :4], rtol=0, atol=1e-12)
    assert not torch.allclose(driven[:, 4:], frozen[:, 4:])
    assert state.position == 12
    # The returned state continues the stream with the ordinary forward.
    logits, _ = model(random_ids(2, 3, seed=1), state)
    assert torch.isfinite(logits).all()
