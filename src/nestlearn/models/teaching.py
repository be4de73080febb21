"""Running a model the way its CMS levels learn: with the LM teach signal where it is used.

A CMS layer built with ``teach_signal="lm"`` (docs/paper.md section 3, the Eq. 71 reading of
the teach signal) learns only when its stream runs through
``nestlearn.nn.teach_signal.stream_with_teach_signal``; a plain ``model(ids, state)`` keeps its
levels frozen. Evaluation and generation call :func:`scored_forward`, which picks the driver
when the model holds such a layer and the plain forward otherwise, so no caller can forget it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nestlearn.nn.cms import ContinuumMemory
from nestlearn.nn.teach_signal import stream_with_teach_signal


def uses_lm_teach_signal(model: nn.Module) -> bool:
    """Whether ``model`` holds a CMS layer whose levels learn from the LM teach signal."""
    return any(isinstance(module, ContinuumMemory) and module.config.teach_signal == "lm"
               for module in model.modules())


def scored_forward(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                   state: Any = None, teach: bool | None = None) -> tuple[torch.Tensor, Any]:
    """``(logits, state)`` of ``ids [B, T]`` continuing ``state``, where ``targets [B, T]``
    (the next tokens, ``IGNORE_INDEX`` where none) drive the LM-taught CMS levels.

    ``teach`` (default: :func:`uses_lm_teach_signal`) picks the teach-signal driver, which
    needs autograd: call under ``torch.no_grad`` (it enables gradients for the inner step
    only), not under ``torch.inference_mode``. Its segments are cut at every multiple of the
    smallest CMS chunk size, so a stream fed in pieces whose lengths are multiples of it gives
    the same result as one call."""
    if teach is None:
        teach = uses_lm_teach_signal(model)
    if teach:
        return stream_with_teach_signal(model, ids, targets, state)
    return model(ids, state)
