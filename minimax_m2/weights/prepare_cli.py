"""What prepare_weights.py runs: resolve the source, check the layout, prepare, summarise."""

import argparse
import signal
import time
from pathlib import Path

import numpy as np

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.experts import parse_experts, select_experts
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.checkpoint import Checkpoint
from minimax_m2.weights.model_weights import model_dtype
from minimax_m2.weights.prepare import prepare


def _interrupted(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.repo_id is None):
        raise ValueError("give either a checkpoint directory or --repo-id")
    signal.signal(signal.SIGTERM, _interrupted)  # so a terminated run removes its temporary files
    layout = ParallelLayout(args.ep, args.tp, 0, moe_tp=args.moe_tp)
    if args.repo_id:
        from minimax_m2.weights.download import fetch

        root, revision = fetch(args.repo_id, args.revision, args.experts)
        source = {"repo_id": args.repo_id, "revision": revision}
    else:
        root = args.checkpoint
        source = {"path": str(root.resolve())}
    if args.out.resolve() == Path(root).resolve():
        raise ValueError(f"--out {args.out} is the source checkpoint's directory: give the prepared files one of "
                         "their own")
    config = MiniMaxM2Config.from_pretrained(root)
    chosen = select_experts(config, parse_experts(args.experts, config.num_local_experts))
    layout.check(config, len(chosen))
    begin = time.perf_counter()
    if args.fp8 == "keep" and config.fp8_block_size is None:
        raise ValueError("--fp8 keep needs an FP8 checkpoint: this one has no quantization_config")
    manifest = prepare(Checkpoint(root, config, chosen), chosen, layout, args.out, model_dtype(args.dtype), source,
                       keep_fp8=args.fp8 == "keep")
    sizes = [f["bytes"] for f in manifest["files"].values()]
    carried = ", ".join(manifest["carried"]) or "none found"
    print(f"prepared {len(sizes)} rank files in {args.out} ({manifest['skipped']} already complete) in "
          f"{time.perf_counter() - begin:.1f} s: {np.mean(sizes) / 2**20:,.1f} MiB per rank, "
          f"{sum(sizes) / 2**20:,.1f} MiB in all; carried from the source: {carried}")
    return 0
