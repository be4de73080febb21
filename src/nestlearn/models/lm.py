"""Causal language models: embedding, a stack of blocks, final norm and an LM head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nestlearn.debug import debug_checks_enabled
from nestlearn.errors import check_int, invalid
from nestlearn.models.config import ModelConfig
from nestlearn.models.state import LMState, check_state
from nestlearn.nn.cms import TeachHook
from nestlearn.nn.transformer import RMSNorm
from nestlearn.state import tree_map


def check_ids(ids: object, vocab_size: int, check_values: bool = True) -> torch.Tensor:
    """Token ids must be a LongTensor ``[B, T]`` with T >= 1 and values in ``[0, vocab)``.

    The range check reads the ids on the host (a device sync): it runs if ``check_values`` or
    under ``nestlearn.debug_checks``. The model's forward passes False, so a training step
    syncs nowhere; an id out of range then fails in the embedding lookup, where
    :func:`embed_ids` turns torch's error into this one."""
    if not isinstance(ids, torch.Tensor):
        raise invalid("ids", type(ids).__name__, "a torch.LongTensor of shape [B, T]")
    if ids.dtype != torch.long:
        raise invalid("ids.dtype", ids.dtype, "torch.int64 (a LongTensor)")
    if ids.dim() != 2:
        raise invalid("ids.shape", tuple(ids.shape), "2 dims [B, T]")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise invalid("ids.shape", tuple(ids.shape), "B >= 1 and T >= 1 (no empty sequences)")
    if not (check_values or debug_checks_enabled()):
        return ids
    # one host read (a device sync): both ends in one copy
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= vocab_size:
        raise invalid("ids", f"values in [{low}, {high}]", f"values in [0, {vocab_size - 1}]")
    return ids


def embed_ids(embed: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``embed(ids)``; an id out of range (unchecked on the sync-free path, see
    :func:`check_ids`) is reported by name instead of torch's ``IndexError``.

    A plain ``nn.Embedding`` without hooks is looked up with ``index_select``: the same
    values, and a backward (``index_add``) with no host read, which the captured step of
    ``train.cuda_graph`` needs (torch's CUDA embedding backward may size its work on the
    host). ``index_add`` sums repeated ids' gradients with atomics on a GPU, in no fixed
    order. Any other embedding (options, a subclass, hooks) is called as a module."""
    plain = (type(embed) is nn.Embedding and embed.padding_idx is None
             and embed.max_norm is None and not embed.scale_grad_by_freq and not embed.sparse
             and not embed._forward_hooks and not embed._forward_pre_hooks)
    try:
        if plain:
            return embed.weight.index_select(0, ids.reshape(-1)).view(*ids.shape,
                                                                     embed.embedding_dim)
        return embed(ids)
    except IndexError:
        check_ids(ids, embed.num_embeddings)  # raises the clear error (the error path may sync)
        raise


def run_blocks(blocks: Sequence[nn.Module], hidden: torch.Tensor, states: Sequence[Any],
               teach_hook: TeachHook | None = None) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """``hidden [B, T, D]`` through every block in turn: (output, each block's new state).

    ``teach_hook`` (the CMS LM teach-signal driver's) goes to the blocks, which then all hold
    CMS layers (``nestlearn.nn.teach_signal``); blocks without CMS never receive it."""
    hook = {} if teach_hook is None else {"teach_hook": teach_hook}
    new_states = []
    for block, state in zip(blocks, states, strict=True):
        hidden, state = block(hidden, state, **hook)
        new_states.append(state)
    return hidden, tuple(new_states)


def run_blocks_checkpointed(blocks: Sequence[nn.Module], hidden: torch.Tensor,
                            states: Sequence[Any], segment: int
                            ) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """``run_blocks`` with activation checkpointing over segments of ``segment`` tokens.

    Block by block and segment by segment under ``torch.utils.checkpoint`` (non-reentrant),
    each block's state carried to its next segment: the graph keeps only each block's input
    and state at the segment boundaries, and backward recomputes one block on one segment at a
    time. Exact because every block streams exactly (chained segments = one pass).
    """
    states = list(states)
    outputs = []
    for start in range(0, hidden.shape[1], segment):
        x = hidden[:, start:start + segment]
        for index, block in enumerate(blocks):
            x, state = checkpoint(block, x, states[index], use_reentrant=False)
            states[index] = tree_map(_compact, state)
        outputs.append(x)
    return torch.cat(outputs, dim=1), tuple(states)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a view that keeps a larger buffer alive (a conv tail, pending tokens sliced
    from the segment), so a state kept at a segment boundary holds only its own values."""
    if tensor.untyped_storage().nbytes() > 2 * tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _checkpointing(config: ModelConfig, teach_hook: TeachHook | None) -> bool:
    """Checkpoint only when a backward can follow, and not inside a segment of the CMS
    LM teach-signal driver (given a ``teach_hook``): it runs its own short segments, and its
    hook must see each CMS layer once per segment (``nestlearn.nn.teach_signal``)."""
    return (config.checkpoint_segment is not None and torch.is_grad_enabled()
            and teach_hook is None)


class Backbone(nn.Module):
    """Embedding, ``config.layers`` blocks and the final RMSNorm: ids -> hidden states."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise invalid("config", type(config).__name__, "a ModelConfig")
        self.config = config
        self.fingerprint = config.fingerprint()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        self.blocks = nn.ModuleList(config.spec.build_block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> LMState:
        """The state before the first token: every block at its (meta-learned) initial state."""
        check_int("batch", batch)
        blocks = tuple(block.init_state(batch, device=device, dtype=dtype)
                       for block in self.blocks)
        return LMState(blocks=blocks, position=0, batch_size=batch,
                       fingerprint=self.fingerprint)

    def forward(self, ids: torch.Tensor, state: LMState | None = None, *,
                teach_hook: TeachHook | None = None) -> tuple[torch.Tensor, LMState]:
        check_ids(ids, self.config.vocab_size, check_values=False)
        batch, length = ids.shape
        if state is None:
            state = self.init_state(batch)
        check_state(state, self.fingerprint, batch, len(self.blocks))
        hidden = embed_ids(self.embed, ids)
        if _checkpointing(self.config, teach_hook):
            hidden, block_states = run_blocks_checkpointed(
                self.blocks, hidden, state.blocks, self.config.checkpoint_segment)
        else:
            hidden, block_states = run_blocks(self.blocks, hidden, state.blocks, teach_hook)
        new_state = LMState(blocks=block_states, position=state.position + length,
                            batch_size=batch, fingerprint=self.fingerprint)
        return self.norm(hidden), new_state


class CausalLM(nn.Module):
    """A causal LM: ``forward(ids [B, T], state=None) -> (logits [B, T, V], state)``.

    Passing the returned state with the next segment gives exactly the logits of one pass over
    the concatenation (KV cache for attention, memory states for recurrent blocks). With
    ``config.tie_embeddings`` the head reuses the embedding matrix.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        if config.tie_embeddings:
            self.head = None
        else:
            self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
            nn.init.normal_(self.head.weight, std=config.init_std)

    @property
    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    def init_state(self, batch: int, *, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> LMState:
        return self.backbone.init_state(batch, device=device, dtype=dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return F.linear(hidden, self.backbone.embed.weight)
        return self.head(hidden)

    def forward(self, ids: torch.Tensor, state: LMState | None = None, *,
                teach_hook: TeachHook | None = None) -> tuple[torch.Tensor, LMState]:
        """``teach_hook``: the CMS LM teach-signal driver's (``nestlearn.nn.teach_signal``);
        None runs the LM-driven CMS levels at their current weights."""
        hidden, state = self.backbone(ids, state, teach_hook=teach_hook)
        return self.logits(hidden), state
