"""Size of the declared device program at the real MiniMax-M2's shapes, per unit and per rank.

Each unit of `minimax_m2.device.program` is recorded under nkipy's emulated semantics (matmuls sized, not
computed) with zero weights of one rank's shapes, bf16 as on a NeuronCore, for:
  - 1 rank, and 64 ranks (experts spread over 64, attention tp 8, 8 attention groups);
  - a 2048-token prefill (batch 1), and decode at batch 1 and 32 with a 4096-token context.
It prints, per unit: matmuls, GFLOP, the weight bytes the matmuls read (experts apart), trace-time
constant bytes (total and largest), and each collective's payload; then checks the targets:
  - at most 16 MiB of trace-time constants per unit, none growing as (tokens x top_k)^2 (the largest
    constant of a 1024- and a 2048-token prefill are compared: quadratic growth would be 4x);
  - in decode, expert weight bytes per layer at most those of min(L, received slots) experts.

  python benchmarks/program_size.py [--json sizes.json]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimax_m2.config import MiniMaxM2Config  # noqa: E402
from minimax_m2.device.roofline import record_programs  # noqa: E402
from minimax_m2.parallel import ParallelLayout  # noqa: E402
from minimax_m2.weights.model_weights import LAYER_WEIGHT_NAMES  # noqa: E402

CONTEXT = 4096
CONSTANT_LIMIT = 16 * 2**20
EXPERT_WEIGHTS = ("w13", "w2")
OTHER_WEIGHTS = tuple(n for n in LAYER_WEIGHT_NAMES if n not in EXPERT_WEIGHTS) + ("embed", "final_norm", "lm_head")
SCENARIOS = [("prefill", 1, 2048), ("decode", 1, 1), ("decode", 32, 1)]
LAYOUTS = [("1 rank", ParallelLayout()), ("64 ranks (ep 64, tp 8)", ParallelLayout(world=64, tp=8, rank=0))]


def record(config: MiniMaxM2Config, layout: ParallelLayout, phase: str, batch: int, seq: int) -> list[dict]:
    """One row per unit of rank 0's program for this phase."""
    units, programs = record_programs(config, layout, phase=phase, batch=batch, seq=seq, context=CONTEXT)
    layer = units[1].inputs
    local = layer["w13"].shape[0]
    expert_bytes = layer["w13"][0].nbytes + layer["w2"][0].nbytes
    rows = []
    for unit, program in zip(units, programs):
        received = (layout.world * unit.constants["capacity"] if layout.world > 1
                    else layout.rows_per_group(batch) * seq * config.num_experts_per_tok) \
            if unit.name.endswith("_layer") else 0
        rows.append(dict(
            unit=unit.name, violations=program.violations, matmuls=len(program.matmuls), gflop=program.flops / 1e9,
            expert_weight_bytes=program.weight_bytes(EXPERT_WEIGHTS),
            other_weight_bytes=program.weight_bytes(OTHER_WEIGHTS),
            constant_bytes=program.constant_bytes, largest_constant=program.largest_constant,
            collectives=[(c.name, c.payload_bytes) for c in program.collectives],
            experts_held=local, expert_bytes=expert_bytes, received_slots=received,
        ))
    return rows


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    config = MiniMaxM2Config()
    print(f"MiniMax-M2: hidden {config.hidden_size}, {config.num_local_experts} experts "
          f"top-{config.num_experts_per_tok}, intermediate {config.intermediate_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_dim}, "
          f"vocab {config.vocab_size}; bf16 weights and activations, context {CONTEXT}\n")
    results, failures = [], []
    for layout_name, layout in LAYOUTS:
        for phase, batch, seq in SCENARIOS:
            rows = record(config, layout, phase, batch, seq)
            title = f"{layout_name}, {phase} batch {batch}" + (f", {seq} tokens" if phase == "prefill" else "")
            print(f"== {title}")
            print(f"{'unit':<14} {'matmuls':>7} {'GFLOP':>9} {'expert MiB':>10} {'other MiB':>10} "
                  f"{'const MiB':>9} {'largest':>8}  collectives (payload MiB)")
            for r in rows:
                calls = ", ".join(f"{n} {mib(b)}" for n, b in r["collectives"]) or "-"
                print(f"{r['unit']:<14} {r['matmuls']:>7} {r['gflop']:>9.2f} {mib(r['expert_weight_bytes']):>10} "
                      f"{mib(r['other_weight_bytes']):>10} {mib(r['constant_bytes']):>9} "
                      f"{mib(r['largest_constant']):>8}  {calls}")
                if r["violations"]:
                    failures.append(f"{title} {r['unit']}: {r['violations']}")
                if r["constant_bytes"] > CONSTANT_LIMIT:
                    failures.append(f"{title} {r['unit']}: {mib(r['constant_bytes'])} MiB of constants > 16 MiB")
                if phase == "decode" and r["unit"].endswith("_layer"):
                    bound = min(r["experts_held"], r["received_slots"]) * r["expert_bytes"]
                    read = r["expert_weight_bytes"]
                    print(f"   expert weights read per layer: {mib(read)} MiB = "
                          f"{read / r['expert_bytes']:.0f} experts; bound min(L={r['experts_held']}, "
                          f"received slots={r['received_slots']}) = {mib(bound)} MiB")
                    if read > bound:
                        failures.append(f"{title}: reads {mib(read)} MiB of experts per layer, more than {mib(bound)}")
            print()
            results.append(dict(layout=layout_name, phase=phase, batch=batch, tokens=seq, units=rows))
    half = {r["unit"]: r["largest_constant"] for r in record(config, ParallelLayout(), "prefill", 1, 1024)}
    full = {r["unit"]: r["largest_constant"] for r in results[0]["units"]}
    growth = max(full[u] / max(half[u], 1) for u in full)
    print(f"largest constant, 2048- over 1024-token prefill on 1 rank: {growth:.2f}x (quadratic growth would be 4x)")
    if growth >= 3:
        failures.append(f"a constant grows {growth:.2f}x when the prompt doubles")
    if args.json:
        args.json.write_text(json.dumps(dict(results=results, constant_growth=growth, failures=failures), indent=1))
        print(f"wrote {args.json}")
    print("targets: " + ("all met" if not failures else "MISSED\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
