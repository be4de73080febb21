"""A sequence classifier over the LM backbones, for class-incremental streams."""

from __future__ import annotations

import torch
from torch import nn

from nestlearn.errors import invalid
from nestlearn.models.config import ClassifierConfig
from nestlearn.models.lm import Backbone
from nestlearn.models.state import LMState


class SequenceClassifier(nn.Module):
    """``forward(ids [B, T], state=None, lengths=None) -> (logits [B, C], state)``.

    The backbone's final hidden states are pooled over the valid positions of this call
    (``lengths[b]`` tokens of row b, right padding; all T when None): their mean, or the last
    valid one. The backbone is causal, so padding after a row's tokens cannot change them.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone)
        self.head = nn.Linear(config.backbone.dim, config.num_classes)
        nn.init.normal_(self.head.weight, std=config.backbone.init_std)
        nn.init.zeros_(self.head.bias)

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> LMState:
        return self.backbone.init_state(batch, device=device, dtype=dtype)

    def _check_lengths(self, lengths: object, batch: int, length: int) -> torch.Tensor:
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) \
                or lengths.dtype != torch.long:
            got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else lengths
            raise invalid("lengths", got, f"a LongTensor of shape ({batch},)")
        low, high = torch.stack(torch.aminmax(lengths)).tolist()  # one host read per call
        if low < 1 or high > length:
            raise invalid("lengths", lengths.tolist(), f"values in [1, {length}]")
        return lengths

    def forward(self, ids: torch.Tensor, state: LMState | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, LMState]:
        hidden, state = self.backbone(ids, state)
        batch, length, _ = hidden.shape
        if lengths is None:
            lengths = torch.full((batch,), length, dtype=torch.long, device=ids.device)
        lengths = self._check_lengths(lengths, batch, length)
        if self.config.pooling == "last":
            pooled = hidden[torch.arange(batch, device=ids.device), lengths - 1]
        else:
            valid = torch.arange(length, device=ids.device)[None, :] < lengths[:, None]
            weights = valid.to(hidden.dtype) / lengths[:, None].to(hidden.dtype)
            pooled = torch.einsum("bt,btd->bd", weights, hidden)
        return self.head(pooled), state
