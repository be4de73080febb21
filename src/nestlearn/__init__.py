"""nestlearn: Nested Learning in PyTorch.

Exact chunkwise associative-memory ops, Titans and self-modifying Titans memories, the
Continuum Memory System, HOPE models and deep optimizers.
"""

from nestlearn.debug import debug_checks
from nestlearn.errors import NestlearnError, NonFiniteError

__version__ = "0.2.0.dev0"

__all__ = ["NestlearnError", "NonFiniteError", "__version__", "debug_checks"]
