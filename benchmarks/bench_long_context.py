"""Peak resident memory of a long prompt on CPU: what the paged cache and tiled attention hold as the context grows.

Each case runs in a fresh process: a random-weight MiniMax-M2 (the medium config, float32, or with --small
run_example.py's random mode at --hidden-size, --num-layers, --num-experts), one engine request of PROMPT
tokens prefilled in chunks of --prefill-chunk and 2 new tokens, at --max-seq-len CONTEXT; the process
reports its peak RSS (ru_maxrss) and the bytes of KV its request really holds. Printed: the long prompt's
peak minus its KV, against the short prompt's peak.

  python benchmarks/bench_long_context.py [--cases 4000:4096 60000:65536] [--small [--hidden-size 256 ...]]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import table  # noqa: E402
from benchmarks.medium_config import MEDIUM  # noqa: E402

CHILD = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from minimax_m2.device.memory import kv_block_bytes
from minimax_m2.device.step import blocks_for
from minimax_m2.generation import Sampling
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.run import random_config
from minimax_m2.serving.engine import Engine
config = {config}
model = MiniMaxM2Model.random(config, seed=0, max_seq_len={context})
engine = Engine(model, max_num_seqs=1, prefill_chunk={chunk}, keep_logits=False)
start = time.perf_counter()
engine.generate([np.random.default_rng(0).integers(0, config.vocab_size, {prompt}).tolist()],
                Sampling(max_new_tokens=2))
kv = blocks_for({prompt} + 1) * kv_block_bytes(config, model.layout, model.dtype)
print(json.dumps(dict(peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, kv=kv,
                      seconds=time.perf_counter() - start)))
"""


def run_case(prompt: int, context: int, args: argparse.Namespace) -> dict:
    if args.small:
        config = f"random_config({args.hidden_size}, {args.num_layers}, {args.num_experts}, 2, 1024)"
    else:
        config = f"MiniMaxM2Config.from_dict({MEDIUM!r})"
    code = CHILD.format(root=str(ROOT), config=config, context=context, chunk=args.prefill_chunk, prompt=prompt)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["4000:4096", "60000:65536"], help="PROMPT:CONTEXT pairs")
    parser.add_argument("--small", action="store_true", help="run_example.py's random config instead of the medium one")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    table.header("prompt", "--max-seq-len", "peak RSS MiB", "KV held MiB", "peak - KV MiB", "prefill s")
    for case in args.cases:
        prompt, context = map(int, case.split(":"))
        r = run_case(prompt, context, args)
        rows.append(dict(prompt=prompt, context=context, **r))
        table.row(f"{prompt:,}", f"{context:,}", f"{r['peak'] / 2**20:.0f}", f"{r['kv'] / 2**20:.1f}",
                  f"{(r['peak'] - r['kv']) / 2**20:.0f}", f"{r['seconds']:.1f}")
    if len(rows) > 1:
        ratio = (rows[-1]["peak"] - rows[-1]["kv"]) / rows[0]["peak"]
        print(f"(longest peak - its KV) / shortest peak: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
