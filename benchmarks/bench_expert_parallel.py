"""Expert parallelism on CPU: decode ms/token, all_to_all bytes per token per layer and resident weight
bytes per rank, for W = 1, 2, 4 ranks (torchrun, gloo) on the medium random config, tp 1.

  python benchmarks/bench_expert_parallel.py [--ranks 1 2 4] [--prompt-len 32] [--decode-steps 16]

Each W is one torchrun launch of this script with --worker; rank 0 reports one JSON line. The ranks
share this machine's cores (torchrun gives each one BLAS thread), so the timings show the cost of the
exchange, not the speed-up of separate devices.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.medium_config import MEDIUM  # noqa: E402
from minimax_m2 import MiniMaxM2Config, MiniMaxM2Model  # noqa: E402
from minimax_m2.distributed import start  # noqa: E402

MARK = "RESULT "


def worker(prompt_len: int, steps: int) -> None:
    layout, backend = start(tp=1, timeout_seconds=600)
    config = MiniMaxM2Config.from_dict(MEDIUM)
    model = MiniMaxM2Model.random(config, seed=0, max_seq_len=prompt_len + steps + 1, layout=layout)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len))
    token = model.forward(prompt, all_logits=False)[:, -1].argmax(-1)[:, None]
    sent_before = backend.all_to_all_bytes if backend else 0
    begin = time.perf_counter()
    for _ in range(steps):
        token = model.forward(token)[:, -1].argmax(-1)[:, None]
    decode = (time.perf_counter() - begin) / steps
    sent = (backend.all_to_all_bytes if backend else 0) - sent_before
    if layout.rank == 0:
        print(MARK + json.dumps({
            "ranks": layout.world,
            "decode_ms": decode * 1e3,
            "a2a_bytes_per_token_layer": sent / steps / config.num_hidden_layers,
            "weight_bytes_rank0": model.weights.nbytes(),
            "expert_bytes_rank0": sum(w.w13.nbytes + w.w2.nbytes for w in model.weights.layers),
            "experts_rank0": model.weights.layers[0].w13.shape[0],
        }), flush=True)
    if backend:
        backend.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.prompt_len, args.decode_steps)
        return
    rows = []
    for world in args.ranks:
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), __file__,
             "--worker", "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps)],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode or not lines:
            sys.exit(f"W={world} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(lines[0][len(MARK):]))
    base = rows[0]
    print(f"medium config, batch 1, prompt {args.prompt_len}, {args.decode_steps} decode steps, tp 1")
    print(f"{'ranks':>5}{'experts/rank':>14}{'decode ms/tok':>15}{'a2a KiB/tok/layer':>19}"
          f"{'weights MiB/rank':>18}{'of which experts':>18}{'experts vs W=1':>16}")
    for r in rows:
        print(f"{r['ranks']:>5}{r['experts_rank0']:>14}{r['decode_ms']:>15.2f}{r['a2a_bytes_per_token_layer'] / 1024:>19.1f}"
              f"{r['weight_bytes_rank0'] / 2**20:>18.1f}{r['expert_bytes_rank0'] / 2**20:>18.1f}"
              f"{r['expert_bytes_rank0'] / base['expert_bytes_rank0']:>15.2f}x")


if __name__ == "__main__":
    main()
