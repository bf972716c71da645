"""Prefill tokens/s and decode ms/token: this project vs transformers eager, same weights, one process, CPU.

Medium random config: hidden 1024, 8 layers, 64 experts top-8, expert intermediate 512, 16/4 heads,
head_dim 64, vocab 32000. Needs the test dependencies (torch, transformers).

  python benchmarks/bench_vs_transformers.py [--prompt-len 128] [--decode-steps 32]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MiniMaxM2Config as HFConfig
from transformers import MiniMaxM2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    return prefill, (time.perf_counter() - start) / steps


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
    return prefill, (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = p.parse_args()

    torch.manual_seed(0)
    reference = MiniMaxM2ForCausalLM(HFConfig(**MEDIUM)).eval()
    reference.config._attn_implementation = "eager"
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = MiniMaxM2Model.from_pretrained(tmp, max_seq_len=args.prompt_len + args.decode_steps + 1)
    prompt = np.random.default_rng(0).integers(0, MEDIUM["vocab_size"], (1, args.prompt_len))

    ours_runs = [_time_ours(ours, prompt, args.decode_steps) for _ in range(args.repeats)]
    hf_runs = [_time_hf(reference, prompt, args.decode_steps) for _ in range(args.repeats)]
    ours_prefill, ours_decode = min(r[0] for r in ours_runs), min(r[1] for r in ours_runs)
    hf_prefill, hf_decode = min(r[0] for r in hf_runs), min(r[1] for r in hf_runs)
    n = args.prompt_len
    print(f"torch threads {torch.get_num_threads()}, prompt {n} tokens, {args.decode_steps} decode steps, best of {args.repeats}")
    print(f"{'':14}{'prefill tok/s':>15}{'decode ms/tok':>15}")
    print(f"{'this project':14}{n / ours_prefill:15.1f}{ours_decode * 1e3:15.2f}")
    print(f"{'transformers':14}{n / hf_prefill:15.1f}{hf_decode * 1e3:15.2f}")
    print(f"ratio (ours / transformers): prefill throughput {hf_prefill / ours_prefill:.2f}x, "
          f"decode speed {hf_decode / ours_decode:.2f}x")


if __name__ == "__main__":
    main()
