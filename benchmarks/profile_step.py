"""Where a served step's time goes on this CPU: the engine's steps on the medium random config (hidden 1024,
8 layers, 64 experts top-8, float32), split into the parts of the units and the engine's own host work.

Cases: decode steps of 1 and 16 rows at a --context-token context (greedy, and sampled with temperature
1.0 and top_k 40, as chat clients ask), and prefill steps of 16 prompts of --prompt tokens arriving
together (chunks of --prefill-chunk). Each part is timed around its call (the units' attention, experts
(router included), the rest of each layer (norms, residuals, exchanges), the lm_head's projection and its
choice of tokens, the embedding); host = the engine's step minus its units. Medians over --steps steps.

  python benchmarks/profile_step.py [--steps 10] [--context 200] [--prompt 150] [--prefill-chunk 256]
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minimax_m2.device.units as units  # noqa: E402
from benchmarks import table  # noqa: E402
from benchmarks.medium_config import MEDIUM  # noqa: E402
from minimax_m2 import MiniMaxM2Model  # noqa: E402
from minimax_m2.config import MiniMaxM2Config  # noqa: E402
from minimax_m2.generation import Sampling  # noqa: E402
from minimax_m2.serving.engine import Engine  # noqa: E402

PARTS = {"attention": "attention", "experts": "moe_block", "lm_head projection": "vocab_slice_logits",
         "choosing tokens": "sample_vocab_parallel", "greedy": "greedy_vocab_parallel"}
SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start
    return call


def instrument(model: MiniMaxM2Model) -> None:
    """Time the units' parts (their module's names, looked up at each call) and each unit (the runner)."""
    for part, name in PARTS.items():
        setattr(units, name, timed(part, getattr(units, name)))
    runner = model.runner
    model.runner = lambda unit: timed(f"unit {unit.name}", runner)(unit)


def split(engine: Engine, steps: int) -> dict[str, float]:
    """Median ms per step of each part over `steps` engine steps."""
    samples = defaultdict(list)
    for _ in range(steps):
        SPENT.clear()
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        layers = SPENT["unit prefill_layer"] + SPENT["unit decode_layer"]
        head = SPENT["unit lm_head"]
        chosen = SPENT["choosing tokens"] + SPENT["greedy"]
        parts = {"step": total, "attention": SPENT["attention"], "experts": SPENT["experts"],
                 "rest of the layers": layers - SPENT["attention"] - SPENT["experts"],
                 "lm_head projection": SPENT["lm_head projection"], "choosing tokens": chosen,
                 "rest of the lm_head": head - SPENT["lm_head projection"] - chosen,
                 "embedding": SPENT["unit embedding"],
                 "host": total - sum(v for k, v in SPENT.items() if k.startswith("unit "))}
        for k, v in parts.items():
            samples[k].append(v)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def decode_case(model: MiniMaxM2Model, rows: int, context: int, sampling: Sampling, steps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    engine = Engine(model, max_num_seqs=rows, prefill_chunk=512, keep_logits=False)
    requests = [engine.submit(rng.integers(0, MEDIUM["vocab_size"], context).tolist(), sampling)
                for _ in range(rows)]
    while not all(r.decoding for r in requests):
        engine.step()
    engine.step()
    result = split(engine, steps)
    for r in requests:
        engine.cancel(r)
    engine.step()
    return result


def prefill_case(model: MiniMaxM2Model, prompts: int, length: int, chunk: int, steps: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    engine = Engine(model, max_num_seqs=prompts, prefill_chunk=chunk, keep_logits=False)
    for _ in range(prompts):
        engine.submit(rng.integers(0, MEDIUM["vocab_size"], length).tolist(), Sampling(max_new_tokens=1))
    result = split(engine, min(steps, prompts * length // chunk))
    while not engine.idle():
        engine.step()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--prompt", type=int, default=150)
    p.add_argument("--prefill-chunk", type=int, default=256)
    args = p.parse_args()
    model = MiniMaxM2Model.random(MiniMaxM2Config.from_dict(MEDIUM), seed=0, max_seq_len=2048)
    instrument(model)
    greedy, sampled = Sampling(max_new_tokens=1000), Sampling(max_new_tokens=1000, temperature=1.0, top_k=40)
    cases = {
        "decode, 1 row, greedy": decode_case(model, 1, args.context, greedy, args.steps),
        "decode, 1 row, sampled": decode_case(model, 1, args.context, sampled, args.steps),
        "decode, 16 rows, greedy": decode_case(model, 16, args.context, greedy, args.steps),
        "decode, 16 rows, sampled": decode_case(model, 16, args.context, sampled, args.steps),
        f"prefill, 16 prompts of {args.prompt}": prefill_case(model, 16, args.prompt, args.prefill_chunk, args.steps),
    }
    names = list(next(iter(cases.values())))
    print(f"medium config on this CPU, context {args.context}, median ms per step of {args.steps} (share of the step)")
    table.header("part", *cases)
    for name in names:
        table.row(name, *(f"{c[name]:.1f}" + ("" if name == "step" else f" ({c[name] / c['step']:.0%})")
                          for c in cases.values()))


if __name__ == "__main__":
    main()
