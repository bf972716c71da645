"""Prepare MiniMax-M2 weights for a layout: one safetensors file per rank, in kernel layout.

  python prepare_weights.py CHECKPOINT_DIR --out DIR [--ep W --tp T --moe-tp M] [--experts 0-7] [--dtype bfloat16]
  python prepare_weights.py --repo-id MiniMaxAI/MiniMax-M2 [--revision R] --out DIR [...]

CHECKPOINT_DIR is a Hugging Face checkpoint directory or cache snapshot; --repo-id downloads only the
shards the selected experts need into the HF cache first. Then run with
`run_example.py --mode generate --weights DIR` (under torchrun, each rank loads its own file).
"""

import argparse
import sys
from pathlib import Path

from minimax_m2.run import exit_with
from minimax_m2.weights.prepare_cli import run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", type=Path, help="checkpoint directory or HF cache snapshot")
    p.add_argument("--repo-id", help="download from the Hugging Face Hub instead (only the shards needed)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) with --repo-id (default: main)")
    p.add_argument("--out", type=Path, required=True, help="output directory (files, manifest.json)")
    p.add_argument("--ep", type=int, default=1, help="ranks W (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="attention tensor-parallel ranks (default: %(default)s)")
    p.add_argument("--moe-tp", type=int, default=1, help="ranks each expert is sliced over (default: %(default)s)")
    p.add_argument("--experts", help="expert ids to keep, e.g. 0-7 or 0,3,5 (default: all)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="bfloat16 as NeuronCores take it, float32 the exact CPU reference (default: %(default)s)")
    p.add_argument("--fp8", choices=["keep", "dequantize"], default="dequantize",
                   help="an FP8 checkpoint's experts: written as their 8-bit codes and block scales (run_example.py "
                        "--fp8 keep), or dequantised to --dtype (default: %(default)s)")
    return p.parse_args(argv)


if __name__ == "__main__":
    exit_with(lambda: run(parse_args(sys.argv[1:])))
