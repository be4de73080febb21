"""Counting host reads (device syncs on a GPU) in tests, on CPU."""

from __future__ import annotations

import torch


class ReadCounter:
    """Counts ``Tensor.tolist``/``item``/``__bool__``/``__float__`` calls while patched in."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("tolist", "item", "__bool__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, original):
        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        return counted
