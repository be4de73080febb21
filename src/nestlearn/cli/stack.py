"""``nestlearn stack --from-hf DIR --out DIR``: a HOPE model whose CMS levels start from a
Llama model's MLPs (level stacking, docs/paper.md section 3)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _chunk_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"got {text!r}; allowed: comma-separated ints, e.g. 16,64") from err


def run(args: argparse.Namespace) -> int:
    from nestlearn.hf import stack_hf_folder  # needs transformers: a clear error if missing

    out = stack_hf_folder(args.from_hf, args.out, arch=args.arch,
                          cms_chunk_sizes=args.cms_chunk_sizes, mlp_level=args.mlp_level,
                          cms_inner_lr=args.cms_inner_lr)
    print(f"wrote {out} (arch {args.arch}; nestlearn.hf.load_hf_folder or "
          "AutoModelForCausalLM after `import nestlearn.hf`)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stack", help="build a HOPE model whose CMS levels start from a Llama model's MLPs",
        description="Read a Llama-architecture Hugging Face folder (save_pretrained), copy it "
                    "into a HOPE-attention (or HOPE) model whose CMS levels start from its "
                    "MLPs, and write that as a Hugging Face folder. With --cms-inner-lr 0 "
                    "(the default) and arch hope-attention the result computes the Llama "
                    "model's logits. GPT-2 and other families are refused. Needs the extra "
                    "nestlearn[hf].",
    )
    parser.add_argument("--from-hf", type=Path, required=True, metavar="DIR",
                        help="Hugging Face folder of a LlamaForCausalLM")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder to write (created if missing)")
    parser.add_argument("--arch", default="hope-attention", choices=("hope-attention", "hope"),
                        help="hope-attention keeps the attention (exact at inner rate 0); "
                             "hope replaces it with a fresh self-modifying Titans mixer")
    parser.add_argument("--cms-chunk-sizes", type=_chunk_sizes, default=None, metavar="N,N",
                        help="chunk sizes of the CMS levels, fastest first (default: 16,64)")
    parser.add_argument("--mlp-level", type=int, default=None, metavar="L",
                        help="level (0 = fastest) that receives each MLP (default: slowest)")
    parser.add_argument("--cms-inner-lr", type=float, default=0.0, metavar="LR",
                        help="inner learning rate of every CMS level (default 0)")
    parser.set_defaults(func=run)
