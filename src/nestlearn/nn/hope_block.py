"""The HOPE block (docs/paper.md section 5): self-modifying Titans, then a Continuum Memory System.

    h = x + SelfModifyingTitans(norm(x))
    y = CMS(h)

The CMS levels carry their own pre-norm and residual (``nestlearn.nn.cms``), as in
``HOPEAttentionBlock``, whose attention this block replaces by the self-modifying Titans mixer.
"""

from __future__ import annotations

import torch
from torch import nn

from nestlearn.errors import invalid
from nestlearn.nn.cms import CMSConfig, ContinuumMemory, ContinuumMemoryState, TeachHook
from nestlearn.nn.self_modifying import (
    SelfModifyingTitans,
    SelfModifyingTitansConfig,
    SelfModifyingTitansState,
)
from nestlearn.nn.transformer import RMSNorm, check_input
from nestlearn.state import TreeState, state_dataclass


@state_dataclass
class HOPEBlockState(TreeState):
    """State of a ``HOPEBlock``: the self-modifying Titans state and the CMS state."""

    titans: SelfModifyingTitansState
    cms: ContinuumMemoryState


class HOPEBlock(nn.Module):
    """Self-modifying Titans + CMS: ``forward(x [B, T, D], state=None) -> (y, state)``.

    ``titans.dim`` and ``cms.dim`` must agree. With ``titans.use_naive`` both parts run their
    token-by-token references (the CMS through ``ContinuumMemory.forward_naive``), for tests.
    """

    def __init__(self, titans: SelfModifyingTitansConfig, cms: CMSConfig,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if not isinstance(titans, SelfModifyingTitansConfig):
            raise invalid("titans", type(titans).__name__, "a SelfModifyingTitansConfig")
        if not isinstance(cms, CMSConfig):
            raise invalid("cms", type(cms).__name__, "a CMSConfig")
        if cms.dim != titans.dim:
            raise invalid("cms.dim", cms.dim, f"the block's dim (titans.dim = {titans.dim})")
        self.dim = titans.dim
        self.norm = RMSNorm(titans.dim, norm_eps)
        self.titans = SelfModifyingTitans(titans)
        self.cms = ContinuumMemory(cms)

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> HOPEBlockState:
        """Every memory at its meta-learned initial state, position 0."""
        return HOPEBlockState(self.titans.init_state(batch, device=device, dtype=dtype),
                              self.cms.init_state(batch, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: HOPEBlockState | None = None, *,
                teach_hook: TeachHook | None = None) -> tuple[torch.Tensor, HOPEBlockState]:
        """``teach_hook``: the LM teach-signal driver's hook, handed to the CMS."""
        if state is not None and not isinstance(state, HOPEBlockState):
            raise invalid("state", type(state).__name__, "a HOPEBlockState or None")
        x = check_input(x, self.dim, self.norm.weight.dtype)
        mixed, titans = self.titans(self.norm(x), None if state is None else state.titans)
        cms = self.cms.forward_naive if self.titans.config.use_naive else self.cms
        y, cms_state = cms(x + mixed, None if state is None else state.cms,
                           teach_hook=teach_hook)
        return y, HOPEBlockState(titans, cms_state)
