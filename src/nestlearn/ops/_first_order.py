"""The guard of the autograd nodes whose backward is written by hand from saved intermediates."""

from __future__ import annotations

import torch

from nestlearn.errors import NestlearnError


def check_first_order(node: str) -> None:
    """Raise on a double backward (``create_graph=True``): a written backward that reads
    forward intermediates saved without their graph would return wrong second derivatives,
    silently. Call it first thing in such a backward."""
    if torch.is_grad_enabled():
        raise NestlearnError(
            f"{node}: got a backward with create_graph=True; allowed: first-order gradients "
            "only (its backward is written by hand; nothing in nestlearn differentiates it "
            "twice)")
