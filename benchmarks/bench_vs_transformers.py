"""Prefill and decode throughput: this project vs transformers eager, same weights, one process, this CPU.

Medium random config (hidden 1024, 8 layers, 64 experts top-8, expert intermediate 512, 16/4 heads of 64,
vocab 32000), float32 in both, side by side in one run: for each batch (1, 8, 32) and prompt length
(128, 512), prefill tokens/s of the whole batch and decode tokens/s (batch x steps / seconds), best of
--repeats, with their ratios and each project's decode speed-up over its own batch 1. Needs the test
dependencies (torch, transformers).

  python benchmarks/bench_vs_transformers.py [--batches 1 8 32] [--prompts 128 512] [--decode-steps 16] [--json F]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MiniMaxM2Config as HFConfig
from transformers import MiniMaxM2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import table  # noqa: E402
from benchmarks.medium_config import MEDIUM  # noqa: E402
from minimax_m2 import MiniMaxM2Model  # noqa: E402


def _time_ours(model: MiniMaxM2Model, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    model.reset()
    start = time.perf_counter()
    logits = model.forward(prompt, all_logits=False)
    prefill = time.perf_counter() - start
    token = logits[:, -1].argmax(-1)[:, None]
    start = time.perf_counter()
    for _ in range(steps):
        token = model.forward(token)[:, -1].argmax(-1)[:, None]
    return prefill, time.perf_counter() - start


@torch.no_grad()
def _time_hf(model: MiniMaxM2ForCausalLM, prompt: np.ndarray, steps: int) -> tuple[float, float]:
    ids = torch.tensor(prompt)
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    token = out.logits[:, -1].argmax(-1)[:, None]
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1)[:, None]
    return prefill, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()

    torch.manual_seed(0)
    reference = MiniMaxM2ForCausalLM(HFConfig(**MEDIUM)).eval()
    reference.config._attn_implementation = "eager"
    context = max(args.prompts) + args.decode_steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = MiniMaxM2Model.from_pretrained(tmp, max_seq_len=context)
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}, {args.decode_steps} decode steps, best of {args.repeats}; "
          f"tokens/s, ratio = this project / transformers", flush=True)
    table.header("batch", "prompt", "prefill: this project", "transformers", "ratio", "decode: this project",
                 "transformers", "ratio")
    rows = []
    for prompt_len in args.prompts:
        for batch in args.batches:
            prompt = rng.integers(0, MEDIUM["vocab_size"], (batch, prompt_len))
            ours_runs = [_time_ours(ours, prompt, args.decode_steps) for _ in range(args.repeats)]
            hf_runs = [_time_hf(reference, prompt, args.decode_steps) for _ in range(args.repeats)]
            row = {"batch": batch, "prompt": prompt_len,
                   "prefill_tok_s": batch * prompt_len / min(r[0] for r in ours_runs),
                   "hf_prefill_tok_s": batch * prompt_len / min(r[0] for r in hf_runs),
                   "decode_tok_s": batch * args.decode_steps / min(r[1] for r in ours_runs),
                   "hf_decode_tok_s": batch * args.decode_steps / min(r[1] for r in hf_runs)}
            row["prefill_ratio"] = row["prefill_tok_s"] / row["hf_prefill_tok_s"]
            row["decode_ratio"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
            rows.append(row)
            table.row(batch, prompt_len, f"{row['prefill_tok_s']:.1f}", f"{row['hf_prefill_tok_s']:.1f}",
                      f"{row['prefill_ratio']:.2f}x", f"{row['decode_tok_s']:.1f}", f"{row['hf_decode_tok_s']:.1f}",
                      f"{row['decode_ratio']:.2f}x")
    print("\ndecode tok/s over batch 1 at the same prompt length (this project, transformers):")
    for row in rows:
        one = next(r for r in rows if r["prompt"] == row["prompt"] and r["batch"] == min(args.batches))
        row["decode_vs_batch1"] = row["decode_tok_s"] / one["decode_tok_s"]
        row["hf_decode_vs_batch1"] = row["hf_decode_tok_s"] / one["hf_decode_tok_s"]
        print(f"  batch {row['batch']:3d}, prompt {row['prompt']}: {row['decode_vs_batch1']:.2f}x, "
              f"{row['hf_decode_vs_batch1']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"config": MEDIUM, "decode_steps": args.decode_steps, "repeats": args.repeats,
                                         "torch_threads": torch.get_num_threads(), "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
