"""Roofline projection of the declared device program on trn2.48xlarge (64 logical NeuronCores).

Projects TTFT for a 2048-token prompt and decode TPOT at batch 1, 8, 32 and 256 (4096-token context)
for the MoE layouts (moe_tp, moe_ep) = (1, 64), (64, 1), (8, 8), attention tp 8, from the recorded
units' per-rank bytes read, matmul FLOPs and collective payloads (minimax_m2/roofline.py). Prints every
assumption with its source, the table beside NxDI's measured TPOT, and the terms of the best batch-1
step.

  python benchmarks/roofline.py [--json roofline.json]
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimax_m2.config import MiniMaxM2Config  # noqa: E402
from minimax_m2.parallel import ParallelLayout  # noqa: E402
from minimax_m2.roofline import NXDI_MEASURED, TRN2, record_units, step_seconds  # noqa: E402

WORLD, TP, CONTEXT, PROMPT = 64, 8, 4096, 2048
LAYOUTS = [(1, 64), (64, 1), (8, 8)]
BATCHES = [1, 8, 32, 256]
TARGET_MS = 5.0


def terms(costs, layers: int, hw) -> dict[str, float]:
    """Milliseconds per step spent on memory, matmuls and collectives (each unit's max of the first two)."""
    memory = compute = comm = 0.0
    for i, c in enumerate(costs):
        n = layers if i == 1 else 1
        memory += n * c.bytes_read / hw.memory_bytes_per_s
        compute += n * c.flops / hw.matmul_flops_per_s
        comm += n * c.collective_seconds(hw)
    return {"memory_ms": memory * 1e3, "matmul_ms": compute * 1e3, "collectives_ms": comm * 1e3,
            "collectives_per_step": sum((layers if i == 1 else 1) * len(c.collectives) for i, c in enumerate(costs))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = MiniMaxM2Config()
    layers = config.num_hidden_layers
    hw = TRN2
    print(f"hardware: {hw.name}")
    print(f"  memory {hw.memory_bytes_per_s / 1e9:.0f} GB/s, bf16 matmuls {hw.matmul_flops_per_s / 1e12:.1f} TFLOPS, "
          f"collective latency {hw.collective_latency_s * 1e6:.0f} us, links {hw.local_link_bytes_per_s / 1e9:.0f} GB/s "
          f"within a chip / {hw.remote_link_bytes_per_s / 1e9:.0f} GB/s across chips, per rank")
    for fact, source in hw.sources.items():
        print(f"  - {fact}: {source}")
    print(f"model: MiniMax-M2 ({layers} layers), bf16 weights, {WORLD} ranks, attention tp {TP}, context {CONTEXT}\n")

    rows = []
    for moe_tp, moe_ep in LAYOUTS:
        layout = ParallelLayout(WORLD, TP, 0, moe_tp=moe_tp)
        prefill = record_units(config, layout, phase="prefill", batch=1, seq=PROMPT, context=CONTEXT)
        row = {"moe_tp": moe_tp, "moe_ep": moe_ep, "ttft_ms": step_seconds(prefill, layers, hw) * 1e3, "tpot_ms": {},
               "terms": {}}
        for batch in BATCHES:
            decode = record_units(config, layout, phase="decode", batch=batch, seq=1, context=CONTEXT)
            row["tpot_ms"][batch] = step_seconds(decode, layers, hw) * 1e3
            row["terms"][batch] = terms(decode, layers, hw)
            if batch == 1:
                row["tpot_ms_at_latency"] = {
                    us: step_seconds(decode, layers, dataclasses.replace(hw, collective_latency_s=us * 1e-6)) * 1e3
                    for us in (5, 20)}
        rows.append(row)

    head = " | ".join(f"TPOT b={b}" for b in BATCHES)
    print(f"| layout (moe_tp, moe_ep) | TTFT {PROMPT} tok | {head} | TPOT b=1 at 5 / 20 us |")
    print("|---|---|" + "---|" * len(BATCHES) + "---|")
    for r in rows:
        tpots = " | ".join(f"{r['tpot_ms'][b]:.2f} ms" for b in BATCHES)
        at = r["tpot_ms_at_latency"]
        print(f"| ({r['moe_tp']}, {r['moe_ep']}) | {r['ttft_ms']:.0f} ms | {tpots} | {at[5]:.2f} / {at[20]:.2f} ms |")
    for name, tpot in NXDI_MEASURED:
        print(f"| {name} | | {tpot} ms |" + " |" * (len(BATCHES) - 1) + " |")

    best = min(rows, key=lambda r: r["tpot_ms"][1])
    t = best["terms"][1]
    print(f"\nbest at batch 1: (moe_tp, moe_ep) = ({best['moe_tp']}, {best['moe_ep']}), TPOT {best['tpot_ms'][1]:.2f} ms: "
          f"memory {t['memory_ms']:.2f} ms, matmuls {t['matmul_ms']:.2f} ms, collectives {t['collectives_ms']:.2f} ms "
          f"({t['collectives_per_step']} per token)")
    dominant = max(("memory", t["memory_ms"]), ("matmuls", t["matmul_ms"]), ("collectives", t["collectives_ms"]),
                   key=lambda kv: kv[1])[0]
    verdict = "met" if best["tpot_ms"][1] <= TARGET_MS else f"missed; the dominant term is {dominant}"
    print(f"target TPOT <= {TARGET_MS} ms at batch 1: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(dict(hardware=dataclasses.asdict(hw), layouts=rows, nxdi=NXDI_MEASURED,
                                             target_ms=TARGET_MS, verdict=verdict), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
