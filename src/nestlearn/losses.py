"""The language-model loss and the target id it skips, shared by training, evaluation and the
teach signal of CMS layers.

``IGNORE_INDEX`` marks targets that are not scored (the padding of a short document's window);
it is ``torch.nn.functional.cross_entropy``'s default ``ignore_index``. This module imports only
torch, so ``nestlearn.nn`` can use it without an import cycle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over every scored target of ``logits`` [..., V] and
    ``targets`` [...] (targets equal to ``IGNORE_INDEX`` add nothing).

    A sum, not a mean: each token's gradient counts once, independent of the batch size (the
    paper's sum over a chunk), and a mean over several processes divides by the global count.
    Half-precision logits (bf16 autocast) are scored in float32.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def scored_targets(targets: torch.Tensor) -> torch.Tensor:
    """How many targets :func:`lm_loss_sum` scores (those not equal to ``IGNORE_INDEX``)."""
    return (targets != IGNORE_INDEX).sum()
