"""MoE layouts on CPU: measured decode ms/token beside what the roofline projection predicts from the
recorded program and this machine's measured figures, with the expert weight bytes each rank reads per
decode step, all_to_all bytes and resident weight bytes per rank. Medium random config, batch 1,
torchrun (gloo) with W = 1, 2, 4 ranks, attention tp 1 and 2, experts spread (moe_tp 1), sliced over all
ranks (moe_tp W) and mixed.

  python benchmarks/bench_expert_parallel.py [--layouts 1x1x1 2x1x1 ...] [--prompt-len 32] [--decode-steps 16]

A layout is RANKSxTPxMOE_TP. Each one is a torchrun launch of this script with --worker, repeated
--repeat times (medians reported); rank 0 reports one JSON line. The W ranks share this machine's
cores and memory bus, so each rank's figures are measured as its share: W one-thread processes run the
same probe at once (GEMV bandwidth, matmul rate, and the cost of one recorded NumPy op, from a model too
small for bytes or FLOPs to count), and each launch measures what each collective kind adds between
stretches of compute, as the program meets them. Wall time at W > 1 thus measures the sum of all
ranks' work, while the bytes per rank are what carry over to separate NeuronCores. A CPU thread
streams a matmul's weights and then computes (measured and printed: a 32-row matmul takes the sum of
the two, not the larger), so the CPU projection adds memory and matmul time where the Trainium one
takes the larger.
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
from minimax_m2 import MiniMaxM2Config, MiniMaxM2Model  # noqa: E402
from minimax_m2.device.roofline import Hardware, record_units, step_seconds  # noqa: E402
from minimax_m2.distributed import start  # noqa: E402
from minimax_m2.run import random_config  # noqa: E402

MARK = "RESULT "
CORES = os.cpu_count() or 1


def measure_machine(start_at: float = 0.0) -> dict:
    """One-thread figures of this process (started with OMP_NUM_THREADS=1), measured from `start_at`
    (time.time(); processes given the same start measure at once): GEMV bandwidth, matmul rate, and the
    cost of one recorded op, from a decode step of a model too small for anything else to count."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 16384), dtype=np.float32)  # 256 MiB, streamed like decode weights
    x = rng.standard_normal((1, 4096), dtype=np.float32)
    skinny = rng.standard_normal((32, 4096), dtype=np.float32)  # 32 rows, as an expert-parallel rank's decode
    a, b = rng.standard_normal((512, 1024), dtype=np.float32), rng.standard_normal((1024, 1024), dtype=np.float32)
    tiny = random_config(128, 2, 4, 2, 256)
    model = MiniMaxM2Model.random(tiny, max_seq_len=64)
    model.forward(np.zeros((1, 8), np.int64))
    ops = sum(c.ops * (tiny.num_hidden_layers if i == 1 else 1)
              for i, c in enumerate(record_units(tiny, model.layout, phase="decode", batch=1, seq=1, context=64,
                                                 dtype=np.dtype(np.float32))))

    def median(fn, repeat: int) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    while time.time() < start_at:
        time.sleep(0.001)
    return {
        "memory_bytes_per_s": w.nbytes / median(lambda: x @ w, 9),
        "matmul_flops_per_s": 2 * 512 * 1024 * 1024 / median(lambda: a @ b, 25),
        "op_overhead_s": median(lambda: model.forward(np.zeros((1, 1), np.int64)), 25) / ops,
        "skinny_matmul_s": median(lambda: skinny @ w, 5),
        "skinny_matmul_flops": 2 * 32 * 4096 * 16384,
        "skinny_matmul_bytes": w.nbytes,
    }


def shared_machine(processes: int) -> dict:
    """One process's figures while `processes` one-thread processes run the same probe at once (the mean
    over them): its share of the cores and the memory bus."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        figures = pool.map(measure_machine, [time.time() + 15.0] * processes)
        pool.close()
        pool.join()
    return {key: float(np.mean([f[key] for f in figures])) for key in figures[0]}


def collective_latency(backend, layout, costs: list) -> dict[tuple[str, int], float]:
    """Seconds each collective of the recorded program adds, by (kind, ranks in its group), measured after
    the run over the program's own replica groups (gloo) the way the program meets them: between
    stretches of compute (a 16 MiB GEMV), as the extra time over the compute alone. Idle ranks answer
    faster than busy ones on this machine, so idle latency would understate what a collective costs."""
    rng = np.random.default_rng(layout.rank)
    w, v = rng.standard_normal((1024, 4096), dtype=np.float32), rng.standard_normal((1, 1024), dtype=np.float32)
    kinds = {(c.name, len(c.replica_groups[0])): c.replica_groups for cost in costs for c in cost.collectives}

    def seconds(step, repeat: int = 50) -> float:
        backend.all_reduce(np.zeros(1, np.float32), layout.world_groups)
        start = time.perf_counter()
        for _ in range(repeat):
            step()
        return (time.perf_counter() - start) / repeat

    calls = {"all_reduce": lambda x, groups: backend.all_reduce(x, groups),
             "all_gather": lambda x, groups: backend.all_gather(x, 0, groups),
             "all_to_all": lambda x, groups: backend.all_to_all(x, 0, 0, groups)}
    latency = {}
    for (name, size), groups in sorted(kinds.items()):
        x = np.ones((size, 8), np.float32)
        compute = seconds(lambda: v @ w)
        latency[name, size] = max(0.0, seconds(lambda: (v @ w, calls[name](x, groups))) - compute)
    return latency


def this_machine(figures: dict, world: int, latency: dict[tuple[str, int], float]) -> Hardware:
    """One rank of `world` on this machine: its share of the machine, measured with `world` processes."""
    return Hardware(
        name=f"this machine, one of {world} ranks on {CORES} cores",
        memory_bytes_per_s=figures["memory_bytes_per_s"],
        matmul_flops_per_s=figures["matmul_flops_per_s"],
        op_overhead_s=figures["op_overhead_s"],
        collective_latency_s=max(latency.values(), default=0.0),
        latency_by_collective=latency,
        local_link_bytes_per_s=figures["memory_bytes_per_s"],
        remote_link_bytes_per_s=figures["memory_bytes_per_s"],
        ranks_per_chip=world,
        overlaps_memory_and_compute=False,
    )


def worker(prompt_len: int, steps: int, tp: int, moe_tp: int, machine: dict) -> None:
    layout, backend = start(tp=tp, timeout_seconds=600, moe_tp=moe_tp)
    config = MiniMaxM2Config.from_dict(MEDIUM)
    context = prompt_len + steps + 1
    model = MiniMaxM2Model.random(config, seed=0, max_seq_len=context, layout=layout)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len))
    token = model.forward(prompt, all_logits=False)[:, -1].argmax(-1)[:, None]
    sent_before = backend.all_to_all_bytes if backend else 0
    begin = time.perf_counter()
    for _ in range(steps):
        token = model.forward(token)[:, -1].argmax(-1)[:, None]
    decode = (time.perf_counter() - begin) / steps
    sent = (backend.all_to_all_bytes if backend else 0) - sent_before
    costs = record_units(config, layout, phase="decode", batch=1, seq=1, context=context, dtype=np.dtype(np.float32))
    latency = collective_latency(backend, layout, costs) if backend else {}
    predicted = step_seconds(costs, config.num_hidden_layers, this_machine(machine, layout.world, latency))
    if layout.rank == 0:
        print(MARK + json.dumps({
            "ranks": layout.world, "tp": layout.tp, "moe_tp": layout.moe_tp,
            "decode_ms": decode * 1e3, "predicted_ms": predicted * 1e3,
            "collective_latency_us": {f"{k}/{n}": v * 1e6 for (k, n), v in latency.items()},
            "expert_read_bytes_per_step": config.num_hidden_layers * costs[1].expert_bytes,
            "a2a_bytes_per_token_layer": sent / steps / config.num_hidden_layers,
            "weight_bytes_rank0": model.weights.nbytes(),
            "expert_bytes_rank0": sum(w.w13.nbytes + w.w2.nbytes for w in model.weights.layers),
            "experts_rank0": model.weights.layers[0].w13.shape[0],
        }), flush=True)
    if backend:
        backend.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", help="RANKSxTPxMOE_TP",
                   default=["1x1x1", "2x1x1", "2x1x2", "4x1x1", "4x1x4", "4x1x2", "2x2x1", "4x2x1", "4x2x4"])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="launches per layout; medians are reported")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--moe-tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--machine", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.prompt_len, args.decode_steps, args.tp, args.moe_tp, json.loads(args.machine))
        return
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # one thread per rank and probe process
    layouts = [tuple(map(int, layout.split("x"))) for layout in args.layouts]
    machines = {world: shared_machine(world) for world in sorted({w for w, _, _ in layouts})}
    rows = []
    for world, tp, moe_tp in layouts:
        runs = []
        for _ in range(args.repeat):
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                 __file__,
                 "--worker", "--tp", str(tp), "--moe-tp", str(moe_tp), "--prompt-len", str(args.prompt_len),
                 "--decode-steps", str(args.decode_steps), "--machine", json.dumps(machines[world])],
                capture_output=True, text=True, check=False, cwd=ROOT,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
            if done.returncode or not lines:
                sys.exit(f"{world}x{tp}x{moe_tp} failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(lines[0][len(MARK):]))
        row = dict(runs[0])
        for key in ("decode_ms", "predicted_ms"):
            row[key] = float(np.median([r[key] for r in runs]))
        row["collective_latency_us"] = {k: float(np.median([r["collective_latency_us"][k] for r in runs]))
                                        for k in runs[0]["collective_latency_us"]}
        row["decode_ms_runs"] = [round(r["decode_ms"], 1) for r in runs]
        rows.append(row)
    alone = machines[1] if 1 in machines else shared_machine(1)
    for world, m in machines.items():
        print(f"one of {world} one-thread processes at once: GEMV {m['memory_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
              f"{m['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, {m['op_overhead_s'] * 1e6:.2f} us per NumPy op; "
              f"{CORES} cores")
    memory = alone["skinny_matmul_bytes"] / alone["memory_bytes_per_s"]
    matmul = alone["skinny_matmul_flops"] / alone["matmul_flops_per_s"]
    print(f"32-row matmul streaming 256 MiB of weights, alone: {alone['skinny_matmul_s'] * 1e3:.1f} ms measured; "
          f"read {memory * 1e3:.1f} + matmul {matmul * 1e3:.1f} = {(memory + matmul) * 1e3:.1f} ms if one follows "
          f"the other, {max(memory, matmul) * 1e3:.1f} ms if they overlap: the projection adds them")
    print(f"medium config, batch 1, prompt {args.prompt_len}, {args.decode_steps} decode steps, float32; "
          f"medians of {args.repeat} launches")
    short = {"all_reduce": "ar", "all_gather": "ag", "all_to_all": "a2a"}
    print(f"{'ranks':>5}{'tp':>4}{'moe_tp':>7}{'measured ms':>12}{'predicted ms':>13}{'ratio':>7}"
          f"{'expert MiB read/rank':>21}{'a2a KiB/tok/layer':>19}{'weights MiB/rank':>18}   "
          "collective ms by kind/ranks; launches ms")
    for r in rows:
        latency = " ".join(f"{short[k.split('/')[0]]}/{k.split('/')[1]} {v / 1e3:.1f}"
                           for k, v in r["collective_latency_us"].items()) or "-"
        print(f"{r['ranks']:>5}{r['tp']:>4}{r['moe_tp']:>7}{r['decode_ms']:>12.1f}{r['predicted_ms']:>13.1f}"
              f"{r['decode_ms'] / r['predicted_ms']:>7.2f}{r['expert_read_bytes_per_step'] / 2**20:>21.1f}"
              f"{r['a2a_bytes_per_token_layer'] / 1024:>19.1f}{r['weight_bytes_rank0'] / 2**20:>18.1f}   {latency}; "
              f"{r['decode_ms_runs']}")


if __name__ == "__main__":
    main()
