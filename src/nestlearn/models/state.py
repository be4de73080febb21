"""The recurrent state of a model: each block's state plus the position offset.

A state belongs to one configuration and one batch size; ``check_state`` refuses any other,
so a cache of one model cannot silently corrupt another's outputs.
"""

from __future__ import annotations

from typing import Any

from nestlearn.errors import invalid
from nestlearn.state import TreeState, state_dataclass, static_field


@state_dataclass
class LMState(TreeState):
    """State of a ``CausalLM`` or classifier backbone between segments.

    ``blocks``: one state per block (None = that block's fresh initial state, e.g. before the
    first token); ``position``: tokens seen so far (the next token's absolute position);
    ``batch_size`` and ``fingerprint`` (the config's hash) identify whom the state belongs to.
    """

    blocks: tuple[Any, ...]
    position: int = static_field()
    batch_size: int = static_field()
    fingerprint: str = static_field()


def check_state(state: object, fingerprint: str, batch_size: int, num_blocks: int) -> LMState:
    """Refuse a state of another configuration, batch size or depth with a clear message."""
    if not isinstance(state, LMState):
        raise invalid("state", type(state).__name__, "an LMState (from this model) or None")
    if state.fingerprint != fingerprint:
        raise invalid("state", f"a state of another model config (fingerprint {state.fingerprint})",
                      f"a state of this model's config (fingerprint {fingerprint})")
    if state.batch_size != batch_size:
        raise invalid("state", f"a state for batch size {state.batch_size}",
                      f"a state for the batch size of ids ({batch_size})")
    if len(state.blocks) != num_blocks:
        raise invalid("state.blocks", f"{len(state.blocks)} block states",
                      f"{num_blocks} (one per block)")
    return state
