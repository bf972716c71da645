"""Roofline projection of the declared device program on trn2.48xlarge (64 logical NeuronCores).

From the recorded units' per-rank bytes read, matmul FLOPs and collective payloads (minimax_m2/device/roofline.py),
for the MoE layouts (moe_tp, moe_ep) = (1, 64), (64, 1), (8, 8) with attention tp 8, prints:

1. TTFT of a 2048-token prompt and decode TPOT at batch 1, 8, 32 and 256 (4096-token context), each with
   the host's part: units launched per step and host-device copies (ids, positions, random draws);
   beside NxDI's measured TPOT, with the batch-1 TPOT's sensitivity to the assumed latencies;
2. expert bytes read per rank per layer beside the expected distinct-expert floor (each held expert's
   slice read once if any token chose it), and all bytes beside the floor plus the other bytes read;
3. serving throughput at 32 and 256 concurrent requests, decode alone and with each request's prompt
   prefilled;
4. the compile set of a serving engine (every program its warm-up compiles) at 4096 and 196,608
   positions: program count per unit, expert blocks unrolled, the largest program of each unit as
   recorded (ops, matmuls), and what each cut of the set costs in TTFT or TPOT; and that engine's memory
   plan per NeuronCore (what `run_example.py --device neuron` checks before loading);
5. long contexts: TTFT of 32k and 128k-token prompts through chunked prefill, TPOT at those contexts at
   batch 1 and 32, with the KV bytes a decode step reads beside everything else it reads; and both with one
   request's cache spread over the attention groups (context parallelism);
6. FP8 experts kept as 8-bit codes (`--fp8 keep`): TPOT at batch 1, 8, 32 and 256 beside bf16, with the
   bytes a layer reads and the element-wise work of decoding the codes;
7. speculative decoding: the verify step of k = 2, 4, 8 drafts a row at batch 1, 8, 32 and 256, TPOT per
   token at 1.5 to 4 tokens gained a step beside plain decoding, and the batch where it stops paying.

Every assumption is printed with its source or marked ASSUMED.

  python benchmarks/roofline.py [--json roofline.json]
"""

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import table  # noqa: E402
from kernels import collectives  # noqa: E402
from kernels.moe_grouped import DENSE, expert_blocks  # noqa: E402
from minimax_m2.config import MiniMaxM2Config  # noqa: E402
from minimax_m2.device.memory import NEURON_CORE_HBM, engine_plan  # noqa: E402
from minimax_m2.device.nkipy_semantics import EmulatedCollectives, LoopbackCollectives, trace_unit  # noqa: E402
from minimax_m2.device.roofline import (  # noqa: E402
    DECODE_HOST_BYTES_PER_ROW,
    DECODE_HOST_COPIES,
    NXDI_MEASURED,
    READ_BY_MATMULS,
    TRN2,
    decode_launches,
    distinct_expert_floor,
    expert_cost,
    host_seconds,
    record_units,
    served_seconds,
    static_expert_floor,
)
from minimax_m2.device.step import KV_BLOCK, blocks_for, kv_len_for, power_bucket, spread_chunk  # noqa: E402
from minimax_m2.model import MiniMaxM2Model  # noqa: E402
from minimax_m2.parallel import ParallelLayout  # noqa: E402
from minimax_m2.serving.engine import Engine  # noqa: E402
from minimax_m2.serving.shapes import DECODE_TILE_FLOOR, PREFILL_KV_FLOOR  # noqa: E402
from minimax_m2.weights.model_weights import zero_model_weights  # noqa: E402

WORLD, TP, CONTEXT, PROMPT, LONGEST = 64, 8, 4096, 2048, 196_608
LAYOUTS = [(1, 64), (64, 1), (8, 8)]
BATCHES = [1, 8, 32, 256]
OUTPUT_TOKENS = 256  # per request, for the serving throughput with prefill (ASSUMED mix: 2048-token prompts)
# per attention group: 256 concurrent requests over 8 groups; the server keeps no request's logits
SERVING = dict(max_num_seqs=32, prefill_chunk=2048, keep_logits=False)
DECODE_ROWS = (2, SERVING["max_num_seqs"])  # rows per attention group of the engine's decode steps at moe_tp 64


def decode_rows(layout: ParallelLayout, batch: int) -> int | None:
    """Rows per attention group of the engine's decode step for `batch` requests spread over the groups
    (None: the batch's own, where rows size the experts' buffers; see `ShapeSet`)."""
    if layout.moe_tp < layout.world:
        return None
    return next(rows for rows in DECODE_ROWS if layout.rows_per_group(batch) <= rows)


def prefill_kv(end: int, context: int) -> int:
    """Positions the engine's prefill step attends when its rows end at `end` (`ShapeSet.kv_lengths`)."""
    return kv_len_for(max(end, min(PREFILL_KV_FLOOR, context)), context)
TARGETS = {"tpot_b1_ms": 5.0, "tpot_b32_ms": 12.0, "tpot_b256_ms": 25.0, "expert_floor_ratio": 1.3}
NXDI_TOK_S_AT_256 = 128.9


def terms(costs, layers: int, hw, tokens: int) -> dict[str, float]:
    """Milliseconds per decode step on memory, matmuls, collectives and the host, with counts."""
    memory = compute = comm = 0.0
    for i, c in enumerate(costs):
        n = layers if i == 1 else 1
        memory += n * c.bytes_read / hw.memory_bytes_per_s
        compute += n * c.flops / hw.matmul_flops_per_s
        comm += n * c.collective_seconds(hw)
    return {"memory_ms": memory * 1e3, "matmul_ms": compute * 1e3, "collectives_ms": comm * 1e3,
            "host_ms": host_seconds(hw, layers, "decode", tokens) * 1e3,
            "collectives_per_step": sum((layers if i == 1 else 1) * len(c.collectives) for i, c in enumerate(costs)),
            "launches_per_step": decode_launches(layers), "host_copies_per_step": DECODE_HOST_COPIES,
            "host_bytes_per_step": DECODE_HOST_BYTES_PER_ROW * tokens}


def project(config: MiniMaxM2Config, hw) -> list[dict]:
    """Per layout: TTFT, served TPOT per batch, their terms and the expert bytes beside the floor."""
    layers, rows = config.num_hidden_layers, []
    expert = 3 * config.hidden_size * config.intermediate_size * 2  # one whole expert, bf16
    for moe_tp, moe_ep in LAYOUTS:
        layout = ParallelLayout(WORLD, TP, 0, moe_tp=moe_tp)
        prefill = record_units(config, layout, phase="prefill", batch=1, seq=PROMPT, context=CONTEXT,
                               kv_len=prefill_kv(PROMPT, CONTEXT))
        ttft = served_seconds(prefill, layers, hw, "prefill", PROMPT)
        row = {"moe_tp": moe_tp, "moe_ep": moe_ep, "ttft_ms": ttft * 1e3, "tpot_ms": {}, "terms": {}, "bytes": {},
               "static_tpot_floor_ms": {}, "decode": {}}
        for batch in BATCHES:
            decode = record_units(config, layout, phase="decode", batch=batch, seq=1, context=CONTEXT,
                                  rows=decode_rows(layout, batch))
            row["decode"][batch] = decode
            row["tpot_ms"][batch] = served_seconds(decode, layers, hw, "decode", batch) * 1e3
            row["terms"][batch] = terms(decode, layers, hw, batch)
            layer = decode[1]
            floor = distinct_expert_floor(config, layout, batch, expert // moe_tp)
            static = static_expert_floor(config, layout, batch, expert // moe_tp)
            other = layer.bytes_read - layer.expert_bytes
            row["bytes"][batch] = {"expert_mb": layer.expert_bytes / 1e6, "expert_floor_mb": floor / 1e6,
                                   "expert_ratio": layer.expert_bytes / floor, "static_floor_mb": static / 1e6,
                                   "static_ratio": static / floor, "all_mb": layer.bytes_read / 1e6,
                                   "all_floor_mb": (floor + other) / 1e6,
                                   "all_ratio": layer.bytes_read / (floor + other)}
            saved = layers * (layer.expert_bytes - static) / hw.memory_bytes_per_s * 1e3
            t = row["terms"][batch]
            row["static_tpot_floor_ms"][batch] = t["memory_ms"] - saved + t["host_ms"]
        rows.append(row)
    return rows


def sensitivity(best: dict, layers: int, hw) -> dict[str, float]:
    """The best batch-1 TPOT with each latency assumption changed."""
    decode = best["decode"][1]
    cases = {"collective 5 us": dict(collective_latency_s=5e-6), "collective 20 us": dict(collective_latency_s=20e-6),
             "launch 5 us": dict(launch_s=5e-6), "launch 30 us": dict(launch_s=30e-6),
             "host copy 50 us": dict(host_transfer_s=50e-6)}
    return {name: served_seconds(decode, layers, dataclasses.replace(hw, **change), "decode", 1) * 1e3
            for name, change in cases.items()}


def serving(rows: list[dict]) -> list[dict]:
    """Output tok/s at 32 and 256 concurrent requests, best layout: decode alone (batch / TPOT), and with
    each request's 2048-token prompt prefilled one at a time between the decode steps of its
    OUTPUT_TOKENS tokens (C x O / (O x TPOT + C x TTFT))."""
    out = []
    for batch in (32, 256):
        best = min(rows, key=lambda r: r["tpot_ms"][batch])
        tpot, ttft = best["tpot_ms"][batch] / 1e3, best["ttft_ms"] / 1e3
        out.append({"concurrent": batch, "moe_tp": best["moe_tp"], "tpot_ms": tpot * 1e3,
                    "decode_tok_s": batch / tpot,
                    "with_prefill_tok_s": batch * OUTPUT_TOKENS / (OUTPUT_TOKENS * tpot + batch * ttft)})
    return out


def compile_set(config: MiniMaxM2Config, moe_tp: int, hw, context: int = CONTEXT, trace: bool = True) -> dict:
    """Every program a serving engine's warm-up compiles on rank 0 at these settings and `context` positions:
    counts per unit, and when `trace`, the expert blocks its layer programs unroll and the largest program of
    each unit as recorded."""
    layout = ParallelLayout(WORLD, TP, 0, moe_tp=moe_tp)
    experts = list(range(config.num_local_experts))
    weights = zero_model_weights(config, experts, layout, np.dtype(ml_dtypes.bfloat16))
    model = MiniMaxM2Model(config, weights, experts, context, layout)
    model.expert_cost = expert_cost(hw, weights.layers[0])
    engine = Engine(model, **SERVING, kv_blocks=SERVING["max_num_seqs"] * blocks_for(context))
    programs = list(engine.programs().values())
    out = {"settings": dict(SERVING, max_seq_len=context, world=WORLD, tp=TP, moe_tp=moe_tp),
           "step_shapes": len(engine.shapes.shapes()), "programs": len(programs),
           "per_unit": dict(Counter(u.name for u in programs))}
    if not trace:
        return out
    local = weights.layers[0].w13.shape[0]

    def blocks(unit) -> int:
        c = unit.constants
        return local if c["block_rows"] == DENSE else expert_blocks(c["real_pairs"], local, c["block_rows"])

    layer_programs = [u for u in programs if u.name.endswith("_layer")]
    largest = {}
    previous = collectives.set_backend(EmulatedCollectives(LoopbackCollectives()))
    try:
        for name in sorted({u.name for u in programs}):
            mine = [u for u in programs if u.name == name]
            unit = max(mine, key=lambda u: (blocks(u) if u.name.endswith("_layer") else 0,
                                             sum(np.asarray(a).size for a in u.inputs.values())))
            program, _ = trace_unit(unit.fn, unit.inputs, unit.constants, READ_BY_MATMULS, dry=True)
            largest[name] = {"ops": len(program.ops), "matmuls": len(program.matmuls),
                             "constant_kb": program.constant_bytes / 1e3}
    finally:
        collectives.set_backend(previous)
    return dict(out, expert_blocks=sum(blocks(u) for u in layer_programs), largest=largest)


def compile_trades(config: MiniMaxM2Config, hw, moe_tp: int) -> list[tuple[str, float, float]]:
    """What each cut of the compile set costs in the projection (context CONTEXT): (the cut and what it is
    measured on, milliseconds without it, with it)."""
    layout = ParallelLayout(WORLD, TP, 0, moe_tp=moe_tp)
    layers = config.num_hidden_layers

    def decode(batch: int, rows: int | None = None, context: int = CONTEXT) -> float:
        costs = record_units(config, layout, phase="decode", batch=batch, seq=1, context=context, rows=rows)
        return served_seconds(costs, layers, hw, "decode", batch) * 1e3

    def prefill(batch: int, seq: int, kv: int) -> float:
        costs = record_units(config, layout, phase="prefill", batch=batch, seq=seq, context=CONTEXT, kv_len=kv)
        return served_seconds(costs, layers, hw, "prefill", seq) * 1e3

    groups = WORLD // TP
    return [
        (f"decode steps run {DECODE_ROWS[0]} or {DECODE_ROWS[1]} rows per group, not the batch's bucket: TPOT b=32",
         decode(32), decode(32, decode_rows(layout, 32))),
        ("  the same, TPOT b=64", decode(64), decode(64, decode_rows(layout, 64))),
        (f"a decode step attends at least {DECODE_TILE_FLOOR} tiles ({DECODE_TILE_FLOOR * KV_BLOCK} positions) a "
         "group: TPOT b=1 at a 256-token context", decode(1, context=256),
         decode(1, context=DECODE_TILE_FLOOR * KV_BLOCK)),
        (f"a prefill attends at least {PREFILL_KV_FLOOR} positions: TTFT of {PROMPT} tokens",
         prefill(1, PROMPT, PROMPT), prefill(1, PROMPT, PREFILL_KV_FLOOR)),
        ("  the same, TTFT of 256 tokens", prefill(1, 256, 256), prefill(1, 256, PREFILL_KV_FLOOR)),
        ("a prefill's experts are sized for every row of the step: TTFT of 256 tokens",
         prefill(1, 256, PREFILL_KV_FLOOR), prefill(groups, 256, PREFILL_KV_FLOOR)),
    ]


LONG_CONTEXTS = (32_768, 131_072)


def long_context(config: MiniMaxM2Config, hw, moe_tp: int) -> dict:
    """TTFT of prompts of LONG_CONTEXTS tokens prefilled in chunks of PROMPT (each chunk attends the bucket of
    its last position: one program per bucket, counted once per chunk) and TPOT at those contexts, batch 1
    and 32, with the KV bytes a decode step reads beside its other bytes; and the same with the prompt's cache
    spread over the attention groups (context parallelism, `spread`)."""
    layout = ParallelLayout(WORLD, TP, 0, moe_tp=moe_tp)
    layers = config.num_hidden_layers
    per_position = 2 * (config.num_key_value_heads // TP) * config.head_dim * 2  # K and V, bf16, one layer
    out = {}
    for context in LONG_CONTEXTS:
        chunks = Counter(prefill_kv((c + 1) * PROMPT, context) for c in range(context // PROMPT))
        ttft = sum(n * served_seconds(record_units(config, layout, phase="prefill", batch=1, seq=PROMPT, context=kv,
                                                   position=kv - PROMPT), layers, hw, "prefill", PROMPT)
                   for kv, n in chunks.items())
        row = {"ttft_s": ttft, "prefill_programs": len(chunks)}
        for batch in (1, 32):
            costs = record_units(config, layout, phase="decode", batch=batch, seq=1, context=context,
                                 rows=decode_rows(layout, batch))
            rows = layout.rows_per_group(batch)  # a decode step reads its tiles: each real row's blocks, padded
            kv = layers * power_bucket(rows * blocks_for(context)) * KV_BLOCK * per_position
            row[f"tpot_ms_b{batch}"] = served_seconds(costs, layers, hw, "decode", batch) * 1e3
            row[f"kv_gb_b{batch}"] = kv / 1e9
            row[f"other_gb_b{batch}"] = (costs[0].bytes_read + layers * costs[1].bytes_read + costs[2].bytes_read
                                         - kv) / 1e9
        row.update(spread_context(config, layout, hw, context, per_position))
        out[context] = row
    return out


def spread_context(config: MiniMaxM2Config, layout: ParallelLayout, hw, context: int, per_position: int) -> dict:
    """One request's `context` tokens striped over the attention groups, block j in group j % dp: its prompt
    prefilled dp chunks a step (one a group, `spread_chunk` tokens each for prefill chunks of PROMPT; every
    group attends all the step's queries against its blocks, tables as wide as the fullest group's, a power
    of two), and its decode at batch 1 (each group reading its share of the blocks)."""
    layers, groups = config.num_hidden_layers, layout.dp
    chunk = spread_chunk(PROMPT, groups)
    step_tokens = groups * chunk
    ends = [(s + 1) * step_tokens for s in range(context // step_tokens)]
    widths = Counter(power_bucket(-(-blocks_for(end) // groups)) for end in ends)
    ttft = 0.0
    for width, n in widths.items():
        end = max(e for e in ends if power_bucket(-(-blocks_for(e) // groups)) == width)
        costs = record_units(config, layout, phase="prefill", batch=groups, seq=chunk, context=context,
                             position=end - chunk, spread=True)
        ttft += n * served_seconds(costs, layers, hw, "prefill", step_tokens)
    costs = record_units(config, layout, phase="decode", batch=1, seq=1, context=context,
                         rows=decode_rows(layout, 1), spread=True)
    kv = layers * power_bucket(-(-blocks_for(context) // groups)) * KV_BLOCK * per_position
    return {"spread_ttft_s": ttft, "spread_prefill_steps": len(ends), "spread_prefill_programs": len(widths),
            "spread_tpot_ms_b1": served_seconds(costs, layers, hw, "decode", 1) * 1e3, "spread_kv_gb_b1": kv / 1e9}


def fp8_experts(config: MiniMaxM2Config, hw, moe_tp: int) -> dict:
    """Per batch: (bf16, FP8 experts) TPOT in ms, a layer's bytes read in MB and its decoding operations."""
    layout = ParallelLayout(WORLD, TP, 0, moe_tp=moe_tp)
    fp8_config = dataclasses.replace(config, fp8_block_size=(128, 128))
    out = {}
    for batch in BATCHES:
        row = {}
        for name, fp8 in (("bf16", False), ("fp8", True)):
            costs = record_units(fp8_config, layout, phase="decode", batch=batch, seq=1, context=CONTEXT,
                                 rows=decode_rows(layout, batch), fp8=fp8)
            row[name] = {"tpot_ms": served_seconds(costs, config.num_hidden_layers, hw, "decode", batch) * 1e3,
                         "layer_mb": costs[1].bytes_read / 1e6, "decode_ops": costs[1].decode_ops}
        out[batch] = row
    return out


SPEC_KS, SPEC_ACCEPTED, SPEC_BATCHES = (2, 4, 8), (1.5, 2.0, 2.5, 3.0, 4.0), (1, 8, 32, 256)


def speculation(config: MiniMaxM2Config, hw, moe_tp: int) -> dict:
    """Per batch: the decode step's TPOT, and per k the verify step (each row its last token and k drafts: a
    prefill's program over the decode rows, attending the context's bucket) and its TPOT per token at each
    acceptance (tokens a row gains a step, at most k + 1)."""
    layout = ParallelLayout(WORLD, TP, 0, moe_tp=moe_tp)
    layers, out = config.num_hidden_layers, {}
    for batch in SPEC_BATCHES:
        rows = decode_rows(layout, batch)
        decode = record_units(config, layout, phase="decode", batch=batch, seq=1, context=CONTEXT, rows=rows)
        row = {"tpot_ms": served_seconds(decode, layers, hw, "decode", batch) * 1e3, "verify": {}}
        for k in SPEC_KS:
            verify = record_units(config, layout, phase="prefill", batch=batch, seq=k + 1, context=CONTEXT,
                                  kv_len=prefill_kv(CONTEXT, CONTEXT), rows=rows, position=CONTEXT - k - 1)
            step = served_seconds(verify, layers, hw, "prefill", batch * (k + 1)) * 1e3
            row["verify"][k] = {"step_ms": step, "tpot_ms": {a: step / a for a in SPEC_ACCEPTED if a <= k + 1}}
        out[batch] = row
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config, hw = MiniMaxM2Config(), TRN2
    layers = config.num_hidden_layers
    print(f"hardware: {hw.name}")
    print(f"  memory {hw.memory_bytes_per_s / 1e9:.0f} GB/s, bf16 matmuls {hw.matmul_flops_per_s / 1e12:.1f} TFLOPS, "
          f"collective latency {hw.collective_latency_s * 1e6:.0f} us, links {hw.local_link_bytes_per_s / 1e9:.0f} "
          f"GB/s "
          f"within a chip / {hw.remote_link_bytes_per_s / 1e9:.0f} GB/s across chips, per rank; "
          f"{hw.launch_s * 1e6:.0f} us per unit launched, {hw.host_transfer_s * 1e6:.0f} us and "
          f"{hw.host_bytes_per_s / 1e9:.0f} GB/s per host-device copy")
    for fact, source in hw.sources.items():
        print(f"  - {fact}: {source}")
    print(f"model: MiniMax-M2 ({layers} layers), bf16 weights, {WORLD} ranks, attention tp {TP}, context {CONTEXT}\n")

    rows = project(config, hw)
    print("1. TTFT and TPOT, device time plus the host's launches and copies")
    table.header("layout (moe_tp, moe_ep)", f"TTFT {PROMPT} tok", *(f"TPOT b={b}" for b in BATCHES))
    for r in rows:
        table.row(f"({r['moe_tp']}, {r['moe_ep']})", f"{r['ttft_ms']:.0f} ms",
                  *(f"{r['tpot_ms'][b]:.2f} ms" for b in BATCHES))
    for name, tpot in NXDI_MEASURED:
        table.row(name, "", f"{tpot} ms", *[""] * (len(BATCHES) - 1))
    best = min(rows, key=lambda r: r["tpot_ms"][1])
    t = best["terms"][1]
    print(f"\nbest at batch 1: ({best['moe_tp']}, {best['moe_ep']}), TPOT {best['tpot_ms'][1]:.2f} ms = memory "
          f"{t['memory_ms']:.2f} ms (overlapping matmuls {t['matmul_ms']:.2f} ms) + collectives "
          f"{t['collectives_ms']:.2f} ms "
          f"({t['collectives_per_step']} a step) + host {t['host_ms']:.2f} ms ({t['launches_per_step']} launches, "
          f"{t['host_copies_per_step']} copies of {t['host_bytes_per_step']} bytes in all)")
    sens = sensitivity(best, layers, hw)
    print("batch-1 TPOT if: " + ", ".join(f"{name}: {ms:.2f} ms" for name, ms in sens.items()))

    print("\n2. Decode bytes read per rank per layer (MB) beside the expected distinct-expert floor, and the least "
          "any static, dropless program reads (every expert some routing of the batch could pick), with the TPOT "
          "that floor allows (its memory time and the host's, collectives left out)")
    table.header("layout", "batch", "experts read", "expert floor", "ratio", "static floor", "ratio", "all bytes",
                 "floor + other bytes", "ratio", "static TPOT floor")
    for r in rows:
        for b in BATCHES:
            x = r["bytes"][b]
            table.row(f"({r['moe_tp']}, {r['moe_ep']})", b, f"{x['expert_mb']:.1f}", f"{x['expert_floor_mb']:.1f}",
                      f"{x['expert_ratio']:.2f}x", f"{x['static_floor_mb']:.1f}", f"{x['static_ratio']:.2f}x",
                      f"{x['all_mb']:.1f}", f"{x['all_floor_mb']:.1f}", f"{x['all_ratio']:.2f}x",
                      f"{r['static_tpot_floor_ms'][b]:.2f} ms")

    served = serving(rows)
    print(f"\n3. Serving throughput, best layout per concurrency (with prefill: {PROMPT}-token prompts prefilled one "
          f"at a time, {OUTPUT_TOKENS} output tokens each; ASSUMED mix)")
    table.header("concurrent", "layout moe_tp", "TPOT", "decode tok/s", "with prefill tok/s")
    for s in served:
        table.row(s["concurrent"], s["moe_tp"], f"{s['tpot_ms']:.2f} ms", f"{s['decode_tok_s']:.0f}",
                  f"{s['with_prefill_tok_s']:.0f}")
    print(f"NxDI measured {NXDI_TOK_S_AT_256} output tok/s in all at 256 users (TTFT 11.3 s) on trn2.48xlarge")

    compiled = compile_set(config, best["moe_tp"], hw)
    s = compiled["settings"]
    print(f"\n4. Compile set of a serving engine (moe_tp {s['moe_tp']}, --max-num-seqs {s['max_num_seqs']}, "
          f"--prefill-chunk {s['prefill_chunk']}, --max-seq-len {s['max_seq_len']}): {compiled['step_shapes']} step "
          f"shapes, {compiled['programs']} programs (NEFFs) per rank: "
          + ", ".join(f"{n} {name}" for name, n in sorted(compiled["per_unit"].items())))
    longest = compile_set(config, best["moe_tp"], hw, LONGEST, trace=False)
    compiled["longest"] = longest
    print(f"  at --max-seq-len {LONGEST}: {longest['step_shapes']} step shapes, {longest['programs']} programs per "
          "rank: " + ", ".join(f"{n} {name}" for name, n in sorted(longest["per_unit"].items())))
    print(f"  expert blocks unrolled over all layer programs: {compiled['expert_blocks']}; largest program of each "
          f"unit "
          "(recorded ops / matmuls / trace-time constants): "
          + ", ".join(f"{name} {x['ops']} / {x['matmuls']} / {x['constant_kb']:.0f} KB"
                      for name, x in compiled["largest"].items()))
    print("  compile time per program on the Neuron compiler: not measured (nothing here has run on hardware)")
    trades = compile_trades(config, hw, best["moe_tp"])
    compiled["trades"] = trades
    print("  what each cut of the compile set costs (context 4096): without it / with it")
    for what, before, after in trades:
        print(f"  - {what}: {before:.2f} / {after:.2f} ms ({after / before:.2f}x)")
    plan = engine_plan(config, ParallelLayout(WORLD, TP, 0, moe_tp=best["moe_tp"]), config.num_local_experts,
                       np.dtype(ml_dtypes.bfloat16), slots=SERVING["max_num_seqs"],
                       prefill_chunk=SERVING["prefill_chunk"], max_seq_len=CONTEXT,
                       kv_blocks=SERVING["max_num_seqs"] * blocks_for(CONTEXT))
    compiled["memory_plan"] = dataclasses.asdict(plan)
    print(f"  memory plan per NeuronCore (bf16): {plan.describe()} of {NEURON_CORE_HBM / 2**30:.0f} GiB HBM")

    at = {b: min(r["tpot_ms"][b] for r in rows) for b in BATCHES}
    floor_ratio = {b: min(r["bytes"][b]["expert_ratio"] for r in rows) for b in (8, 32, 256)}
    verdicts = {
        "tpot_b1_ms": at[1] <= TARGETS["tpot_b1_ms"], "tpot_b32_ms": at[32] <= TARGETS["tpot_b32_ms"],
        "tpot_b256_ms": at[256] <= TARGETS["tpot_b256_ms"],
        "expert_floor_ratio": all(v <= TARGETS["expert_floor_ratio"] for v in floor_ratio.values()),
    }
    print("\ntargets (best layout per batch): "
          f"TPOT b=1 {at[1]:.2f} ms (<= {TARGETS['tpot_b1_ms']}: {'met' if verdicts['tpot_b1_ms'] else 'missed'}), "
          f"b=32 {at[32]:.2f} ms (<= {TARGETS['tpot_b32_ms']}: {'met' if verdicts['tpot_b32_ms'] else 'missed'}), "
          f"b=256 {at[256]:.2f} ms (<= {TARGETS['tpot_b256_ms']}: {'met' if verdicts['tpot_b256_ms'] else 'missed'}); "
          "expert bytes / floor " + ", ".join(f"b={b} {v:.2f}x" for b, v in floor_ratio.items())
          + f" (<= {TARGETS['expert_floor_ratio']}: {'met' if verdicts['expert_floor_ratio'] else 'missed'})")
    static_tpot = {b: min(r["static_tpot_floor_ms"][b] for r in rows) for b in BATCHES}
    static_ratio = {b: min(r["bytes"][b]["static_ratio"] for r in rows) for b in (8, 32, 256)}
    print("no static, dropless program can do better than (best layout per batch): TPOT "
          + ", ".join(f"b={b} {v:.2f} ms" for b, v in static_tpot.items()) + "; expert bytes / floor "
          + ", ".join(f"b={b} {v:.2f}x" for b, v in static_ratio.items()))
    base = min(r["tpot_ms"][1] for r in rows)
    best_tp = min(rows, key=lambda r: r["tpot_ms"][1])["moe_tp"]
    long = long_context(config, hw, best_tp)
    print(f"\n5. Long contexts at ({best_tp}, {WORLD // best_tp}), prompts prefilled in chunks of {PROMPT}, decode "
          "reads per rank per step (KV beside everything else)")
    table.header("context", "TTFT", "TPOT b=1 (vs 4k)", "KV / other GB b=1", "TPOT b=32", "KV / other GB b=32")
    for context, r in long.items():
        table.row(f"{context:,}", f"{r['ttft_s']:.2f} s", f"{r['tpot_ms_b1']:.2f} ms ({r['tpot_ms_b1'] / base:.1f}x)",
                  f"{r['kv_gb_b1']:.3f} / {r['other_gb_b1']:.3f}", f"{r['tpot_ms_b32']:.2f} ms",
                  f"{r['kv_gb_b32']:.3f} / {r['other_gb_b32']:.3f}")
    print("  a decode step reads the blocks its rows attend (tiles): 32 rows of mixed lengths read the sum of their "
          "lengths, not 32 times the longest")
    groups = WORLD // TP
    print(f"  one request's cache spread over the {groups} attention groups (context parallelism: {groups} chunks of "
          f"{spread_chunk(PROMPT, groups)} tokens a prefill step, each group attending every group's queries against "
          "its blocks; two more collectives a layer)")
    table.header("context", "TTFT spread (steps, programs)", "TPOT b=1 spread (vs 4k)", "KV GB b=1 spread")
    for context, r in long.items():
        table.row(f"{context:,}",
                  f"{r['spread_ttft_s']:.2f} s ({r['spread_prefill_steps']}, {r['spread_prefill_programs']})",
                  f"{r['spread_tpot_ms_b1']:.2f} ms ({r['spread_tpot_ms_b1'] / base:.2f}x)",
                  f"{r['spread_kv_gb_b1']:.3f}")
    fp8 = fp8_experts(config, hw, best_tp)
    print(f"\n6. FP8 experts kept as codes at ({best_tp}, {WORLD // best_tp}), decoded in the units (ASSUMED "
          f"{hw.vector_ops_per_s / 1e9:.0f} G element-wise operations/s beside memory and matmuls)")
    table.header("batch", "TPOT bf16", "TPOT FP8 experts", "MB read per layer bf16 / FP8",
                 "decoding operations per layer")
    for batch, r in fp8.items():
        bf16, kept = r["bf16"], r["fp8"]
        table.row(batch, f"{bf16['tpot_ms']:.2f} ms", f"{kept['tpot_ms']:.2f} ms",
                  f"{bf16['layer_mb']:.1f} / {kept['layer_mb']:.1f}", f"{kept['decode_ops'] / 1e6:.0f} M")
    spec = speculation(config, hw, best_tp)
    print(f"\n7. Speculative decoding at ({best_tp}, {WORLD // best_tp}), context {CONTEXT}: a verify step of k drafts "
          "a row (a prefill's program over the decode rows), TPOT per token at each acceptance (tokens a row gains "
          "a step) beside plain decoding")
    table.header("batch", "plain TPOT", "k", "verify step", *(f"TPOT at {a}" for a in SPEC_ACCEPTED))
    for batch, r in spec.items():
        for k, v in r["verify"].items():
            cells = [f"{v['tpot_ms'][a]:.2f} ms" if a in v["tpot_ms"] else "-" for a in SPEC_ACCEPTED]
            table.row(batch, f"{r['tpot_ms']:.2f} ms", k, f"{v['step_ms']:.2f} ms", *cells)
    off = next((b for b, r in spec.items() if r["verify"][4]["tpot_ms"][2.5] >= r["tpot_ms"]), None)
    where = off if off else f"above {SPEC_BATCHES[-1]}"
    print(f"  speculation (k = 4, 2.5 tokens a step) stops paying at batch {where} (of {list(SPEC_BATCHES)})")
    if args.json:
        for r in rows:
            del r["decode"]
        args.json.write_text(json.dumps(dict(hardware=dataclasses.asdict(hw), layouts=rows, nxdi=NXDI_MEASURED,
                                             sensitivity=sens, serving=served, compile_set=compiled, long_context=long,
                                             fp8_experts=fp8, speculation=spec,
                                             targets=TARGETS, verdicts=verdicts,
                                             static_floors=dict(tpot_ms=static_tpot, expert_ratio=static_ratio)),
                                        indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
