"""What bounds a static, dropless expert schedule on this CPU: every candidate measured side by side.

The MoE layers of the medium config (8 layers of 64 experts top-8, hidden 1024, intermediate 512, float32),
each candidate timed as one pass over all 8 layers as in a step (so each layer's experts come from memory,
not from the cache), routed at random, for the pairs of a decode step at batch 1, 8 and 32 and of a prefill
of 128 and 512 tokens. Each candidate of `kernels.moe_grouped.grouped_experts` (blocks of B rows sorted by
expert; dense) is timed, beside two dynamic schedules that a traced program cannot express: the CPU's own
(`block_rows=DYNAMIC`: each expert hit over exactly its own rows, what this CPU runs), and transformers'
`MiniMaxM2Experts` (eager). For each static
candidate the table shows its two worst-case terms: expert weight reads (blocks) against the distinct
experts hit, and rows computed (blocks x B) against the real pairs. The schedule the model chooses (from
this CPU's measured block costs, as a NeuronCore-like static target would) is marked. Best of --repeats.

  python benchmarks/bench_schedules.py [--tokens 1 8 32 128 512] [--json F]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import MiniMaxM2Config as HFConfig
from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2Experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import table  # noqa: E402
from benchmarks.medium_config import MEDIUM  # noqa: E402
from kernels.moe_grouped import DENSE, DYNAMIC, expert_blocks, grouped_experts  # noqa: E402
from minimax_m2.device.expert_schedule import BLOCK_SIZES, choose_block_rows, measure_block_times, measured_table  # noqa: E402

MAX_BLOCKS = 4096  # candidates with more blocks than this are not timed (blocks of one row at long prefills)


def best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    names = ("num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size", "num_hidden_layers")
    experts, top_k, hidden, inter, num_layers = (MEDIUM[k] for k in names)
    rng = np.random.default_rng(0)
    layers = [((rng.standard_normal((experts, 2 * inter, hidden)) * 0.02).astype(np.float32),
               (rng.standard_normal((experts, hidden, inter)) * 0.02).astype(np.float32)) for _ in range(num_layers)]
    # before torch runs: its idle threads spin for a while
    cost = measured_table(measure_block_times([(w13, w2, None) for w13, w2 in layers], np.dtype(np.float32)))
    references = []
    for w13, w2 in layers:
        reference = MiniMaxM2Experts(HFConfig(**MEDIUM)).eval()
        reference.gate_up_proj.data = torch.from_numpy(w13)
        reference.down_proj.data = torch.from_numpy(w2)
        references.append(reference)
    print(f"the MoE layers of the medium config, float32, torch threads {torch.get_num_threads()}, best of "
          f"{args.repeats}; ms per layer, each timed as one pass over all {num_layers} layers (as in a step, each "
          "layer's experts read from memory)", flush=True)

    def per_layer(run_layer) -> float:
        """ms per layer of run_layer(i) over every layer in turn, best of --repeats passes."""
        return best_ms(lambda: [run_layer(i) for i in range(num_layers)], args.repeats) / num_layers

    results = []
    for tokens in args.tokens:
        routed = np.stack([rng.choice(experts, top_k, replace=False) for _ in range(tokens)]).astype(np.int32)
        pairs = tokens * top_k
        ids = routed.reshape(-1)
        x = rng.standard_normal((pairs, hidden)).astype(np.float32)
        valid = np.ones(pairs, bool)
        tokens_x = torch.from_numpy(rng.standard_normal((tokens, hidden)).astype(np.float32))
        index, weights = torch.from_numpy(routed.astype(np.int64)), torch.full((tokens, top_k), 1.0 / top_k)
        row = {"tokens": tokens, "pairs": pairs, "distinct_experts": int(len(np.unique(ids))),
               "chosen": choose_block_rows(pairs, experts, cost), "candidates": []}
        with torch.no_grad():
            row["transformers_ms"] = per_layer(lambda i: references[i](tokens_x, index, weights))
        row["numpy_dynamic_ms"] = per_layer(lambda i: grouped_experts(x, ids, valid, *layers[i], block_rows=DYNAMIC))
        for b in (*BLOCK_SIZES, DENSE):
            blocks = experts if b == DENSE else expert_blocks(pairs, experts, b)
            if (b > pairs and b != DENSE) or blocks > MAX_BLOCKS or (b == DENSE and pairs > 512):
                continue
            ms = per_layer(lambda i: grouped_experts(x, ids, valid, *layers[i], block_rows=b))
            row["candidates"].append({"block_rows": b, "blocks": blocks, "rows_computed": blocks * (b or pairs),
                                      "ms": ms})
        best = min(row["candidates"], key=lambda c: c["ms"])
        row["best_static_ms"] = best["ms"]
        results.append(row)

        print(f"\n{tokens} tokens, {pairs} pairs, {row['distinct_experts']} distinct experts hit: transformers "
              f"{row['transformers_ms']:.1f} ms, NumPy dynamic {row['numpy_dynamic_ms']:.1f} ms")
        table.header("schedule", "weight reads (x distinct)", "rows computed (x pairs)", "ms", "x NumPy dynamic",
                     "x transformers")
        for c in row["candidates"]:
            name = "dense" if c["block_rows"] == DENSE else f"blocks of {c['block_rows']}"
            mark = " (chosen)" if c["block_rows"] == row["chosen"] else ""
            table.row(f"{name}{mark}", f"{c['blocks']} ({c['blocks'] / row['distinct_experts']:.1f}x)",
                      f"{c['rows_computed']} ({c['rows_computed'] / pairs:.1f}x)", f"{c['ms']:.1f}",
                      f"{c['ms'] / row['numpy_dynamic_ms']:.2f}x", f"{c['ms'] / row['transformers_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"config": MEDIUM, "torch_threads": torch.get_num_threads(),
                                         "rows": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
