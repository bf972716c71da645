"""Agents sharing one long system prompt, served on CPU with and without the prefix cache.

The medium random config (as bench_serving.py) behind `run_example.py --mode serve`. A first request sends the
system prompt (--system-tokens, 4000) alone, as a system prompt already in use would be; then --clients (16)
streaming clients at once each send it followed by --own-tokens (200) tokens of their own, --new-tokens (8)
new tokens each. Run once with the prefix cache and once with --no-prefix-reuse, and printed side by side:

- prompt tokens computed (the engine's prompt_tokens counter, the first request included), against
  system + clients x own;
- KV blocks held at the peak (the blocks_used gauge, polled every 50 ms) against the blocks that
  system + clients x (own + new) positions need;
- TTFT p50 / p90 of the clients' requests.

  python benchmarks/bench_shared_prefix.py [--clients 16] [--system-tokens 4000] [--own-tokens 200]
                                           [--new-tokens 8] [--json shared_prefix.json]
"""

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import table  # noqa: E402
from benchmarks.bench_serving import Server, medium_checkpoint, run_clients, stream, summarise, words  # noqa: E402
from minimax_m2.device.step import KV_BLOCK  # noqa: E402


def served(checkpoint: Path, flags: list[str], system: str, jobs: list[list[tuple[str, int]]]) -> dict:
    """The clients' summary, the prompt tokens the engine computed and the most blocks it held."""
    with Server(checkpoint, *flags) as server:
        before = server.metrics()
        stream(server.url, system, 1)
        peak, done = [0.0], threading.Event()

        def poll() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], server.metrics()["blocks_used"])
                time.sleep(0.05)

        watcher = threading.Thread(target=poll)
        watcher.start()
        try:
            summary = summarise(*run_clients(server.url, jobs))
        finally:
            done.set()
            watcher.join()
        after = server.metrics()
    return {**summary, "prompt_tokens": after["prompt_tokens"] - before["prompt_tokens"], "peak_blocks": peak[0],
            "reused_tokens": after["reused_tokens"] - before["reused_tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--system-tokens", type=int, default=4000)
    parser.add_argument("--own-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    system = words(rng, args.system_tokens)
    jobs = [[(system + " " + words(rng, args.own_tokens), args.new_tokens)] for _ in range(args.clients)]
    context = args.system_tokens + args.own_tokens + args.new_tokens
    flags = ["--max-num-seqs", str(args.clients), "--max-seq-len", str(-(-context // KV_BLOCK) * KV_BLOCK),
             "--prefill-chunk", "256"]
    ideal_tokens = args.system_tokens + args.clients * args.own_tokens
    ideal_blocks = -(-(args.system_tokens + args.clients * (args.own_tokens + args.new_tokens)) // KV_BLOCK)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = medium_checkpoint(Path(tmp))
        for name, extra in (("prefix cache", []), ("--no-prefix-reuse", ["--no-prefix-reuse"])):
            results[name] = served(checkpoint, flags + extra, system, jobs)
            print(f"{name}: done", flush=True)
    print(f"\n{args.clients} clients, a {args.system_tokens}-token system prompt (sent once before them) and "
          f"{args.own_tokens} tokens each, {args.new_tokens} new tokens; medium config on this CPU")
    table.header("run", "prompt tokens computed (/ ideal)", "peak KV blocks held (/ ideal)", "TTFT p50 / p90 ms")
    for name, r in results.items():
        table.row(name, f"{r['prompt_tokens']:.0f} ({r['prompt_tokens'] / ideal_tokens:.2f}x)",
                  f"{r['peak_blocks']:.0f} ({r['peak_blocks'] / ideal_blocks:.2f}x)",
                  f"{r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p90']:.0f}")
    ratio = results["prefix cache"]["ttft_ms"]["p50"] / results["--no-prefix-reuse"]["ttft_ms"]["p50"]
    print(f"TTFT p50 with the prefix cache / without: {ratio:.2f}x; ideal prompt tokens {ideal_tokens}, ideal blocks "
          f"{ideal_blocks} ({KV_BLOCK} positions each)")
    if args.json:
        args.json.write_text(json.dumps(dict(results=results, ideal_tokens=ideal_tokens, ideal_blocks=ideal_blocks,
                                             ttft_ratio=ratio), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
