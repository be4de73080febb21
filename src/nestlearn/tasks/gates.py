"""What the Titans memories of a trained task model do with their gates.

For every ``NeuralMemory`` layer (``titans``, ``titans-mag``): the mean, over the real
(non-padding) tokens of evaluation examples, of the learning-rate gate as a fraction of its
ceiling (eta_t / eta_max), of the momentum gate theta_t and of the forgetting gate
1 - alpha_t, beside the ceiling eta_max in use and the memory's chunk size. A gate pinned at
its ceiling (fraction near 1) says the memory wants to write harder than the cap allows; the
cap bounds a token's write to at most ``chunk_step / chunk_size`` of its error when the token is
alone in its chunk (MEMORY_LAYERS.md, "Stability"), which is what one needle gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nestlearn.nn.titans import NeuralMemory
from nestlearn.tasks.example import Example, collate


@torch.no_grad()
def memory_gate_stats(model: nn.Module, examples: Sequence[Example], pad_id: int,
                      batch_size: int = 16) -> list[dict[str, Any]]:
    """One entry per ``NeuralMemory`` layer of ``model`` (empty list without one)."""
    layers = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not layers:
        return []
    sums = [{"eta_fraction": 0.0, "theta": 0.0, "forget": 0.0, "tokens": 0} for _ in layers]
    mask: list[torch.Tensor] = []

    def hook(index: int):
        def record(module: NeuralMemory, args: tuple, output: Any) -> None:
            alpha, eta, theta = module.gate_values(args[0])
            keep = mask[0].unsqueeze(-1).expand_as(eta)
            total = sums[index]
            total["eta_fraction"] += (eta / module.config.resolved_eta_max)[keep].sum().item()
            if theta is not None:
                total["theta"] += theta[keep].sum().item()
            total["forget"] += (1 - alpha)[keep].sum().item()
            total["tokens"] += keep.sum().item()
        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id)
            mask[:] = [batch.inputs != pad_id]
            model(batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = []
    for index, (layer, total) in enumerate(zip(layers, sums, strict=True)):
        count = max(1, total["tokens"])
        config = layer.config
        stats.append({"layer": index, "chunk_size": config.chunk_size,
                      "eta_max": config.resolved_eta_max,
                      "eta_fraction": total["eta_fraction"] / count,
                      "theta": total["theta"] / count if config.momentum else None,
                      "forget": total["forget"] / count})
    return stats
