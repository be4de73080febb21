"""``nestlearn export RUN_DIR --out DIR``: a trained run as a Hugging Face folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from nestlearn.data.tokenizers import ByteTokenizer
    from nestlearn.training import load_trained

    model, _, tokenizer, step = load_trained(args.run_dir, "cpu")
    from nestlearn.hf import save_hf_folder  # needs transformers: a clear error if missing

    byte = isinstance(tokenizer, ByteTokenizer)
    out = save_hf_folder(model, args.out, tokenizer=None if byte else tokenizer)
    print(f"wrote {out} (step {step}, AutoModelForCausalLM after `import nestlearn.hf`)")
    if byte:
        print("note: the byte tokenizer has no transformers equivalent; encode text as UTF-8 "
              f"bytes (end-of-document id {tokenizer.eod_id})", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a trained run as a Hugging Face transformers folder",
        description="Write the latest checkpoint of RUN_DIR as a Hugging Face folder "
                    "(config.json, model.safetensors, generation_config.json, and the "
                    "tokenizer for BPE and pretrained tokenizers) that "
                    "AutoModelForCausalLM.from_pretrained loads once nestlearn.hf is imported. "
                    "Needs the extra nestlearn[hf].",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="folder written by `nestlearn train`")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder to write (created if missing; files of the same names are "
                             "replaced)")
    parser.set_defaults(func=run)
