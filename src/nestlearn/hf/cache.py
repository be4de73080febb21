"""The cache ``generate`` carries between steps: nestlearn's whole model state.

Attention blocks keep their KV cache inside the state and recurrent blocks (Titans, HOPE) their
memories, so one object serves every arch. It is not a ``transformers.Cache`` (those are lists
of per-layer key/value tensors); the model tells ``generate`` so
(``_supports_default_dynamic_cache`` is False) and creates this cache on its first forward.
"""

from __future__ import annotations

from nestlearn.errors import NestlearnError
from nestlearn.models.state import LMState


class NestlearnCache:
    """``state``: the ``LMState`` after ``seen_tokens`` tokens (None before the first)."""

    # What transformers' generation loop asks of a cache it did not create.
    is_compileable = False
    is_croppable = False

    def __init__(self, state: LMState | None = None) -> None:
        self.state = state

    @property
    def seen_tokens(self) -> int:
        return 0 if self.state is None else self.state.position

    @property
    def is_linear(self) -> list[bool]:
        # a state of fixed size per block (no window to slice by): generate must not slice
        return [True]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update(self, state: LMState) -> None:
        self.state = state

    def reorder_cache(self, beam_idx: object) -> None:
        """Beam search would gather the state's rows here; a state may hold tensors shared by
        every row (a CMS level's initial weights before its first update), so this is refused
        rather than guessed."""
        raise NestlearnError("num_beams: beam search is not supported by nestlearn models "
                             "(their state cannot be reordered by beam yet); allowed: 1")

    def __repr__(self) -> str:
        return f"NestlearnCache(seen_tokens={self.seen_tokens})"
