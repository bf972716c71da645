"""Context parallelism on CPU: one long prompt served over W ranks (torchrun, gloo, attention tp 1: W attention
groups), its cache held by one group (`--spread-from 0`) or spread over all of them, side by side in one
launch: time to the first token and per output token, and the KV blocks each group holds afterwards.

Every rank runs the same engine (as `run_example.py --mode generate` does); the cases alternate, --repeat
times each, medians reported. The W ranks share this machine's cores: held by one group, the prompt's
attention and experts run on that group's rank while the others run padding; spread, every rank prefills a
chunk of each step and attends against its share of the blocks.

  python benchmarks/bench_context_parallel.py [--ranks 2] [--prompt-len 8192] [--new-tokens 16] [--small]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.medium_config import MEDIUM  # noqa: E402

MARK = "RESULT "


def worker(args: argparse.Namespace) -> None:
    """One rank: the random model, then each case in turn (the same on every rank); rank 0 prints JSON."""
    from minimax_m2 import MiniMaxM2Config, MiniMaxM2Model
    from minimax_m2.distributed import start
    from minimax_m2.generation import Sampling
    from minimax_m2.run import random_config
    from minimax_m2.serving.engine import Engine

    layout, _ = start(1, 600.0)
    config = random_config(256, 4, 16, 2, 1024) if args.small else MiniMaxM2Config.from_dict(MEDIUM)
    context = args.prompt_len + args.new_tokens
    model = MiniMaxM2Model.random(config, seed=0, max_seq_len=context, layout=layout)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.prompt_len).tolist()
    results: dict[str, list] = {"one group": [], "spread": []}
    tokens: dict[str, list[int]] = {}
    for _ in range(args.repeat):
        for name, spread_from in (("one group", 0), ("spread", 1)):
            engine = Engine(model, max_num_seqs=1, prefill_chunk=args.prefill_chunk, keep_logits=False,
                            spread_from=spread_from)
            times: list[float] = []
            start_at = time.perf_counter()
            result = engine.generate([prompt], Sampling(max_new_tokens=args.new_tokens),
                                     on_token=lambda row, token: times.append(time.perf_counter()))[0]
            tokens[name] = result.generated
            results[name].append(dict(ttft_s=times[0] - start_at,
                                      tpot_ms=(times[-1] - times[0]) / max(1, len(times) - 1) * 1e3,
                                      blocks_cached_per_group=[len(p.cached) for p in engine.cache.pools]))
    if layout.rank == 0:
        print(MARK + json.dumps(dict(results=results, same_tokens=tokens["one group"] == tokens["spread"],
                                     ranks=layout.world, prompt=args.prompt_len, config=config.hidden_size)),
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="a small random config instead of the medium one")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # one thread a rank
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
               __file__, "--worker", "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--prefill-chunk", str(args.prefill_chunk), "--repeat", str(args.repeat)] + ["--small"] * args.small
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=7200)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        sys.exit(f"error: the launch failed:\n{done.stderr[-3000:]}")
    out = json.loads(lines[0][len(MARK):])
    print(f"{out['ranks']} ranks (attention tp 1: {out['ranks']} groups), one thread each, {os.cpu_count()} cores; "
          f"{'small' if args.small else 'medium'} random config, float32; a {out['prompt']}-token prompt in chunks "
          f"of {args.prefill_chunk}, {args.new_tokens} new tokens; medians of {args.repeat}")
    medians = {}
    for name, runs in out["results"].items():
        medians[name] = {k: float(np.median([r[k] for r in runs])) for k in ("ttft_s", "tpot_ms")}
        print(f"  {name:>9}: TTFT {medians[name]['ttft_s']:.2f} s, TPOT {medians[name]['tpot_ms']:.1f} ms; blocks "
              f"cached per group after the request {runs[-1]['blocks_cached_per_group']} "
              f"(runs: {[round(r['ttft_s'], 2) for r in runs]} s)")
    one, spread = medians["one group"], medians["spread"]
    print(f"spread / one group: TTFT {spread['ttft_s'] / one['ttft_s']:.2f}x, TPOT "
          f"{spread['tpot_ms'] / one['tpot_ms']:.2f}x; the same tokens: {out['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
