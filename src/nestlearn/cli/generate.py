"""``nestlearn generate RUN_DIR --prompt TEXT``: sample a continuation from a trained run."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TextIO

import torch

from nestlearn.cli.checkpoint_option import add_checkpoint_argument, resolve_checkpoint
from nestlearn.errors import NestlearnError, invalid

if TYPE_CHECKING:
    from nestlearn.training.runconfig import RunConfig

def default_context(config: RunConfig) -> int | None:
    """The training context for models whose attention sees the whole prompt (positions past
    it were never trained); recurrent and sliding-window models have no such limit."""
    attention = config.model.attention
    if attention is not None and attention.window is None:
        return config.data.seq_len
    return None


def run(args: argparse.Namespace) -> int:
    from nestlearn.models import generate
    from nestlearn.training import load_trained

    if args.max_new_tokens < 0:
        raise invalid("--max-new-tokens", args.max_new_tokens, "an integer >= 0")
    if args.temperature < 0:
        raise invalid("--temperature", args.temperature, "a number >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise invalid("--top-k", args.top_k, "an integer >= 1")
    if args.max_context is not None and args.max_context < 1:
        raise invalid("--max-context", args.max_context,
                      "an integer >= 1 (default: the training context)")
    from nestlearn.training.distributed import resolve_device

    device = resolve_device(args.device)
    checkpoint = resolve_checkpoint(args.run_dir, getattr(args, "checkpoint", None))
    model, config, tokenizer, _ = load_trained(args.run_dir, device, checkpoint)
    # A document starts after an end-of-document token: this is how the model saw text.
    ids = [tokenizer.eod_id, *tokenizer.encode(args.prompt)]
    limit = args.max_context if args.max_context is not None else default_context(config)
    if limit is not None and len(ids) - 1 > limit:
        raise NestlearnError(
            f"--prompt: {len(ids) - 1} tokens; allowed: at most {limit} (the context the "
            "model was trained on; --max-context raises it)"
        )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    printer = TextStream(tokenizer, sys.stdout)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    generate(model, torch.tensor([ids], device=device), args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, generator=generator,
             on_token=printer.add)
    printer.finish()
    return 0


class TextStream:
    """Writes generated text to ``out`` as tokens arrive: the ids not yet shown are decoded
    together and written once they do not end inside a character (a byte token may hold part
    of a UTF-8 character, which decodes to U+FFFD until the rest arrives)."""

    def __init__(self, tokenizer: object, out: TextIO) -> None:
        self.tokenizer = tokenizer
        self.out = out
        self.pending: list[int] = []

    def add(self, tokens: torch.Tensor) -> None:
        self.pending.append(int(tokens[0]))
        text = self.tokenizer.decode(self.pending)
        if text and not text.endswith("\ufffd"):
            self._write(text)

    def finish(self) -> None:
        self._write(self.tokenizer.decode(self.pending) if self.pending else "")
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.pending = []


def register(subparsers: argparse._SubParsersAction) -> None:
    from pathlib import Path

    parser = subparsers.add_parser(
        "generate", help="sample text from a trained run",
        description="Continue --prompt with the run's latest checkpoint (or --checkpoint), "
                    "writing the text as it is produced. Recurrent models (HOPE, Titans) "
                    "carry their memory state token by token; the Transformer uses a KV "
                    "cache; CMS levels taught by the LM signal keep learning.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="folder written by `nestlearn train`")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                        help="tokens to sample (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; 0 decodes greedily (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample among the K most likely tokens (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_checkpoint_argument(parser)
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--max-context", type=int, default=None, metavar="T",
                        help="refuse prompts longer than T tokens (default: the training "
                             "context for global-attention models, no limit for recurrent "
                             "and sliding-window ones)")
    parser.set_defaults(func=run)
