"""Run a chunkwise deep memory over a stream cut at arbitrary points, exactly.

The memories of this project take all gradients of a chunk at the chunk's starting state
(docs/paper.md section 4, chunkwise training). A segment that ends inside a chunk therefore cannot
just hand over the memory after its last token: the next tokens of that chunk still need the
chunk-start weights. So a stream state keeps the memory at the start of the current (partial)
chunk plus the keys, values and gates of the tokens seen since then (fewer than ``chunk_size``).
The next segment replays those pending tokens from the chunk start (their outputs are dropped),
which makes any chain of segments equal one pass over the concatenation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nestlearn.errors import invalid
from nestlearn.ops.deep_memory import DeepMemoryState, deep_memory, deep_memory_token_step
from nestlearn.state import TreeState, state_dataclass


@state_dataclass
class ChunkedMemoryState(TreeState):
    """A deep memory at the start of the current chunk and the tokens seen since.

    ``chunk_start`` is the memory at that chunk's start: its weights are ``[B, H, out, in]``
    (or ``[H, out, in]`` meta-learned initial weights, shared by the batch). ``keys``,
    ``values`` are ``[B, r, H, D]`` and ``alpha``, ``eta``, ``theta`` are ``[B, r, H]``
    (``theta`` is None without momentum), with ``r < chunk_size``. ``current`` is the memory
    after those r tokens (the one that reads the next token; None when r = 0, where it is
    ``chunk_start``): a one-token segment (decoding) takes the per-token step
    ``deep_memory_token_step`` from it instead of replaying the r tokens through the chunkwise
    op. Longer segments replay the pending tokens from ``chunk_start`` and do not read it.
    A layer may keep its pending tokens in its own form: the self-modifying layer's inner
    state holds each token once for all its inner memories (H heads, not one copy per memory)
    with v_t itself (its targets are made at the chunk's end) and the shared gate g_t in
    ``eta`` (the rate is the ceiling times g_t; ``nn/MEMORY_LAYERS.md``).
    """

    chunk_start: DeepMemoryState
    keys: torch.Tensor
    values: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor
    theta: torch.Tensor | None
    current: DeepMemoryState | None = None

    @property
    def pending(self) -> int:
        """Number of tokens of the current chunk already seen."""
        return self.keys.shape[1]

    def check(self, name: str, batch: int, heads: int, dim: int, dtype: torch.dtype,
              chunk_size: int, momentum: bool) -> None:
        """Raise if this state does not fit the calling layer and its input."""
        if not isinstance(self.chunk_start, DeepMemoryState):
            raise invalid(f"{name}.chunk_start", type(self.chunk_start).__name__,
                          "a DeepMemoryState")
        if tuple(self.keys.shape[:1] + self.keys.shape[2:]) != (batch, heads, dim):
            # a self-modifying layer's inner state from before its pending tokens were kept
            # once for all inner memories has a multiple of the heads
            older = (self.keys.dim() == 4 and self.keys.shape[2] > heads
                     and self.keys.shape[2] % heads == 0)
            raise invalid(f"{name}.keys.shape", tuple(self.keys.shape),
                          f"[{batch}, r, {heads}, {dim}] (batch, heads, head_dim of this layer)"
                          + ("; a stream state saved by nestlearn before 0.2.0.dev0's inner "
                             "pending tokens change cannot be read: start a fresh state"
                             if older else ""))
        if self.pending >= chunk_size:
            raise invalid(f"{name}.keys.shape[1]", self.pending, f"fewer than {chunk_size} tokens")
        if (self.theta is None) == momentum:
            raise invalid(f"{name}.theta", "None" if self.theta is None else "a tensor",
                          "a tensor with momentum, None without (a state from another config)")
        if self.current is not None and not isinstance(self.current, DeepMemoryState):
            raise invalid(f"{name}.current", type(self.current).__name__,
                          "None or a DeepMemoryState")
        for index, weight in enumerate(self.chunk_start.weights):
            if weight.dim() == 4 and weight.shape[0] != batch:
                raise invalid(f"{name}.chunk_start.weights[{index}].shape", tuple(weight.shape),
                              f"batch {batch}")
            if weight.dtype != dtype:
                raise invalid(f"{name}.chunk_start.weights[{index}].dtype", weight.dtype,
                              f"{dtype}")


def empty_chunked_state(chunk_start: DeepMemoryState, batch: int, heads: int, dim: int,
                        momentum: bool, like: torch.Tensor) -> ChunkedMemoryState:
    """A stream that has seen no token of its current chunk."""
    def empty(*shape: int) -> torch.Tensor:
        return like.new_zeros(batch, 0, *shape)

    return ChunkedMemoryState(chunk_start, empty(heads, dim), empty(heads, dim), empty(heads),
                              empty(heads), empty(heads) if momentum else None)


def chunk_piece_sizes(pending: int, length: int, chunk_size: int) -> list[int]:
    """Sizes of the pieces of a ``length``-token segment cut where chunks end, its stream
    having ``pending`` tokens of the current chunk already: the rest of that chunk, whole
    chunks, then what is left."""
    first = min(length, chunk_size - pending)
    rest = length - first
    sizes = [first] + [chunk_size] * (rest // chunk_size)
    if rest % chunk_size:
        sizes.append(rest % chunk_size)
    return sizes


MemoryOp = Callable[..., tuple[torch.Tensor, DeepMemoryState | None]]
ValueMap = Callable[[DeepMemoryState, torch.Tensor], torch.Tensor]


def run_chunked_memory(op: MemoryOp, state: ChunkedMemoryState, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, alpha: torch.Tensor, eta: torch.Tensor,
                       theta: torch.Tensor | None, *, chunk_size: int,
                       value_map: ValueMap | None = None, token_step: bool = True,
                       **op_kwargs: object
                       ) -> tuple[torch.Tensor, ChunkedMemoryState]:
    """Outputs ``o [B, T, H, D]`` of ``op`` for the new tokens and the state after them.

    ``op`` is ``deep_memory`` or ``deep_memory_naive``; chunk boundaries are counted from the
    start of the stream, whatever the segment boundaries. ``value_map(memory, v)``, if given,
    turns each chunk's values into the values the memory learns, from the memory at the
    chunk's start (self-generated targets v_hat = M(v), docs/paper.md section 5).
    A one-token segment with ``token_step`` takes the per-token step (no replay; see
    ``ChunkedMemoryState.current``); callers that cut a longer segment into pieces pass
    False for its pieces, which then read the state as the whole segment would.
    """
    if value_map is not None:
        # Each piece ends at or before the next chunk boundary: one chunk-start memory. One
        # split per tensor, not a slice per piece: a slice's backward fills a zero gradient
        # of the whole segment for every piece (O(T^2 / C) traffic), split's is one cat.
        length = k.shape[1]
        sizes = chunk_piece_sizes(state.pending, length, chunk_size)
        pieces = zip(*(x.split(sizes, 1) if x is not None else [None] * len(sizes)
                       for x in (q, k, v, alpha, eta, theta)), strict=True)
        outputs = []
        for q_p, k_p, v_p, alpha_p, eta_p, theta_p in pieces:
            out, state = run_chunked_memory(
                op, state, q_p, k_p, value_map(state.chunk_start, v_p), alpha_p, eta_p,
                theta_p, chunk_size=chunk_size, token_step=token_step and length == 1,
                **op_kwargs)
            outputs.append(out)
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)), state
    if (token_step and k.shape[1] == 1 and op is deep_memory
            and (state.current is not None or state.pending == 0)):
        return _token_step(state, q, k, v, alpha, eta, theta, chunk_size, op_kwargs)
    replayed = state.pending
    keys = torch.cat([state.keys, k], 1)
    values = torch.cat([state.values, v], 1)
    alphas = torch.cat([state.alpha, alpha], 1)
    etas = torch.cat([state.eta, eta], 1)
    thetas = None if theta is None else torch.cat([state.theta, theta], 1)
    # The replayed tokens' outputs were emitted by the previous segment: any query will do.
    queries = torch.cat([state.keys, q], 1)
    total = keys.shape[1]
    complete = (total // chunk_size) * chunk_size

    def run(lo: int, hi: int, initial: DeepMemoryState, keep_state: bool
            ) -> tuple[torch.Tensor, DeepMemoryState | None]:
        return op(queries[:, lo:hi], keys[:, lo:hi], values[:, lo:hi], alphas[:, lo:hi],
                  etas[:, lo:hi], None if thetas is None else thetas[:, lo:hi],
                  initial_state=initial, output_final_state=keep_state, chunk_size=chunk_size,
                  **op_kwargs)

    outputs = []
    memory = state.chunk_start
    if complete > 0:
        out, memory = run(0, complete, memory, True)
        outputs.append(out)
    current = None
    if total > complete:
        # also the memory after the pending tokens: a next one-token segment steps from it
        out, current = run(complete, total, memory, True)
        outputs.append(out)
    o = torch.cat(outputs, 1)[:, replayed:]
    new_state = ChunkedMemoryState(
        memory, keys[:, complete:], values[:, complete:], alphas[:, complete:],
        etas[:, complete:], None if thetas is None else thetas[:, complete:], current)
    return o, new_state


def _token_step(state: ChunkedMemoryState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                alpha: torch.Tensor, eta: torch.Tensor, theta: torch.Tensor | None,
                chunk_size: int, op_kwargs: dict[str, object]
                ) -> tuple[torch.Tensor, ChunkedMemoryState]:
    """``run_chunked_memory`` of one token from ``state.current``: no replay of the pending
    tokens; the token joins them, or ends the chunk and its memory starts the next."""
    options = {name: op_kwargs[name] for name in ("objective", "activation", "dgd")
               if name in op_kwargs}
    previous = state.current if state.current is not None else state.chunk_start
    o, current = deep_memory_token_step(state.chunk_start, previous, q, k, v, alpha, eta, theta,
                                        **options)
    keys = torch.cat([state.keys, k], 1)
    values = torch.cat([state.values, v], 1)
    alphas = torch.cat([state.alpha, alpha], 1)
    etas = torch.cat([state.eta, eta], 1)
    thetas = None if theta is None else torch.cat([state.theta, theta], 1)
    if keys.shape[1] < chunk_size:
        return o, ChunkedMemoryState(state.chunk_start, keys, values, alphas, etas, thetas,
                                     current)
    kept = slice(chunk_size, None)  # the chunk is complete: nothing pending
    return o, ChunkedMemoryState(current, keys[:, kept], values[:, kept], alphas[:, kept],
                                 etas[:, kept], None if thetas is None else thetas[:, kept])
