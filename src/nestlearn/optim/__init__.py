"""Deep optimizers (optimizers as associative memories of gradients) and multi-frequency levels.

Each optimizer is a ``torch.optim.Optimizer``; the update equations, defaults and the AdamW
fallback for non-matrix parameters are in ``optim/README.md``.
"""

from nestlearn.optim.deep_momentum import DeepMomentum
from nestlearn.optim.delta_momentum import DeltaMomentum
from nestlearn.optim.levels import MultiFrequency, level_param_groups
from nestlearn.optim.m3 import M3
from nestlearn.optim.muon import Muon, newton_schulz
from nestlearn.optim.preconditioned import PreconditionedMomentum

__all__ = [
    "M3",
    "DeepMomentum",
    "DeltaMomentum",
    "MultiFrequency",
    "Muon",
    "PreconditionedMomentum",
    "level_param_groups",
    "newton_schulz",
]
