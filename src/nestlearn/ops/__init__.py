"""Associative-memory update rules as pure functions (no parameters, no nn.Module).

Every rule has one contract, ``rule(q, k, v, *gates, initial_state=None,
output_final_state=False, chunk_size=64) -> (o, final_state or None)`` with tensors
``[B, T, H, D]`` and gates ``[B, T, H]``, a fast chunkwise form and a token-by-token ``_naive``
reference with the same signature. Derivations: ``ops/README.md``. ``set_compile(True)``
runs the deep memory's chunk step under ``torch.compile`` (``ops/_compile.py``).
"""

from nestlearn.ops._compile import compile_enabled, set_compile
from nestlearn.ops.deep_memory import (
    DeepMemoryState,
    deep_memory,
    deep_memory_apply,
    deep_memory_naive,
    deep_memory_update,
    init_deep_memory_weights,
)
from nestlearn.ops.delta_rule import gated_delta_rule, gated_delta_rule_naive
from nestlearn.ops.linear_attention import gated_linear_attention, gated_linear_attention_naive
from nestlearn.ops.titans_linear import TitansLinearState, titans_linear, titans_linear_naive

__all__ = [
    "DeepMemoryState",
    "TitansLinearState",
    "compile_enabled",
    "deep_memory",
    "deep_memory_apply",
    "deep_memory_naive",
    "deep_memory_update",
    "gated_delta_rule",
    "gated_delta_rule_naive",
    "gated_linear_attention",
    "gated_linear_attention_naive",
    "init_deep_memory_weights",
    "set_compile",
    "titans_linear",
    "titans_linear_naive",
]
