"""Where a training step's kernels come from: ``nestlearn bench ops-count --sites N``.

The op budget (``opcount.py``) says how many kernels a step issues; this says which functions
of the package issue them, so the next cut can go where the kernels are. One step runs under a
dispatch mode that attributes every computing op (the same ``is_kernel`` test as the budget,
so the sites add up to ``kernels/step``):

- a **forward** kernel to the innermost function of the package on the Python stack when it
  runs (``nestlearn.ops._chunk_read._read_forward``, a written node's as
  ``..._MomentumStateStep.forward``);
- a **backward** kernel to the autograd node running it, named with the package function that
  recorded the node in the forward (``MulBackward0 <- nestlearn.ops.deep_memory._chunk``), read
  from the creation stack autograd keeps in anomaly mode (``check_nan=False``: no extra
  kernels). A written node's own kernels are its ``...Backward`` class. The engine sums the
  gradients of a tensor used more than once while the node that produced the last of them
  is current, so that sum is charged to that node; a kernel with no node current is
  ``(autograd engine)``.

With ``--decode-tokens`` the generation the budget counts is charged the same way (phase
"decode", forward sites only, kernels per token). Counts are deterministic, like the
budget's; anomaly mode makes the counting step slower, not different.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nestlearn.benchmarks.counted_runs import is_kernel, run_decode, seeded_step
from nestlearn.models import ModelConfig

PACKAGE = "nestlearn."
SKIPPED = "nestlearn.benchmarks"  # the counting step itself is not a site
OUTSIDE = "(outside nestlearn)"
ENGINE = "(autograd engine)"
SITE_COLUMNS = ["arch", "phase", "site", "kernels", "share"]
# one frame of a formatted stack: '  File ".../nestlearn/ops/x.py", line 9, in name\n ...'
_FRAME = re.compile(r'File "[^"]*?[\\/](nestlearn[\\/][^"]+)\.py", line \d+, in (\S+)')


def _module_site(module: str, function: str) -> str | None:
    if not module.startswith(PACKAGE) or module.startswith(SKIPPED):
        return None
    return f"{module}.{function}"


def _function_name(code: Any) -> str:
    # the qualified name (Class.method) where Python has it (3.11+)
    return getattr(code, "co_qualname", code.co_name)


def forward_site() -> str:
    """The innermost package function on the current Python stack (``OUTSIDE`` if none)."""
    frame = sys._getframe(1)
    while frame is not None:
        site = _module_site(frame.f_globals.get("__name__", ""), _function_name(frame.f_code))
        if site is not None:
            return site
        frame = frame.f_back
    return OUTSIDE


def creation_site(node: Any) -> str:
    """The innermost package function of the stack that recorded ``node`` (anomaly mode keeps
    it as ``metadata["traceback_"]``), ``OUTSIDE`` if none."""
    for entry in reversed(node.metadata.get("traceback_", [])):
        for path, function in reversed(_FRAME.findall(entry)):
            module = re.sub(r"[\\/]", ".", path).removesuffix(".__init__")
            site = _module_site(module, function)
            if site is not None:
                return site
    return OUTSIDE


class KernelSites(TorchDispatchMode):
    """Counts computing ops by ``(phase, site)`` while active; set ``phase`` to "backward"
    before the backward pass (any other phase is charged by the Python stack). Node names
    are cached per node (a node runs many kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.sites: Counter[tuple[str, str]] = Counter()
        self._node_sites: dict[int, tuple[Any, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_kernel(func):
            self.sites[(self.phase, self._site())] += 1
        return func(*args, **(kwargs or {}))

    def _site(self) -> str:
        if self.phase != "backward":
            return forward_site()
        node = torch._C._current_autograd_node()
        if node is None:
            return ENGINE
        key = id(node)
        if key not in self._node_sites:
            # the node is kept with its name: a freed one's id could name another node
            self._node_sites[key] = (node, f"{type(node).__name__} <- {creation_site(node)}")
        return self._node_sites[key][1]


def count_sites(config: ModelConfig, length: int, batch: int, seed: int = 0
                ) -> Counter[tuple[str, str]]:
    """Kernels of one training step of ``config`` (the budget's seeded step) by
    ``(phase, site)``."""
    counter = KernelSites()

    def to_backward() -> None:
        counter.phase = "backward"

    _, step = seeded_step(config, length, batch, seed, before_backward=to_backward)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Anomaly Detection has been enabled")
        with torch.autograd.detect_anomaly(check_nan=False), counter:
            step()
    return counter.sites


def count_decode_sites(config: ModelConfig, length: int, batch: int, tokens: int,
                       seed: int = 0) -> Counter[tuple[str, str]]:
    """Kernels of greedy generation (the budget's ``--decode-tokens`` run) by site, phase
    "decode": ``tokens`` one-token forwards, no backward."""
    counter = KernelSites()
    counter.phase = "decode"
    run_decode(config, length, batch, tokens, counter, seed)
    return counter.sites


def site_rows(arch: str, sites: Counter[tuple[str, str]], top: int, per: int = 1
              ) -> list[dict[str, Any]]:
    """The ``top`` sites with the most kernels as report rows: kernels over ``per`` (the
    decoded tokens: kernels per token) and their share of all the counted kernels."""
    total = sum(sites.values())
    return [{"arch": arch, "phase": phase, "site": site,
             "kernels": count if per == 1 else count / per,
             "share": count / total}
            for (phase, site), count in sites.most_common(top)]
