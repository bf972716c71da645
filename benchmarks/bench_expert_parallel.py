"""MoE layouts on CPU: measured decode ms/token beside what the roofline projection predicts from the
recorded program and this machine's measured figures, with the expert weight bytes each rank reads per
decode step, all_to_all bytes and resident weight bytes per rank. Medium random config, batch 1,
torchrun (gloo) with W = 1, 2, 4 ranks, attention tp 1 and 2, experts spread (moe_tp 1), sliced over all
ranks (moe_tp W) and mixed.

  python benchmarks/bench_expert_parallel.py [--layouts 1x1x1 2x1x1 ...] [--prompt-len 32] [--decode-steps 16]

A layout is RANKSxTPxMOE_TP. Each one is a torchrun launch of this script with --worker; rank 0 reports one
JSON line. The machine figures (memory bandwidth of a one-thread GEMV, matmul rate, NumPy per-op cost) are
measured once in a separate one-thread process; the collective latency in each launch, between
stretches of compute as in the program. A CPU thread
streams a matmul's weights and then computes (measured and printed: a 32-row matmul takes the sum of
the two, not the larger), so the CPU projection adds memory and matmul time where the Trainium one
takes the larger. The W ranks share this machine's cores and memory bus, so the projection gives each
rank its share of them: wall time at W > 1 measures the sum of all ranks' work, while the bytes per
rank are what carry over to separate NeuronCores.
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
from kernels import collectives  # noqa: E402
from minimax_m2 import MiniMaxM2Config, MiniMaxM2Model  # noqa: E402
from minimax_m2.distributed import start  # noqa: E402
from minimax_m2.roofline import Hardware, record_units, step_seconds  # noqa: E402
from minimax_m2.run import random_config  # noqa: E402

MARK = "RESULT "
CORES = os.cpu_count() or 1


def measure_machine() -> dict:
    """One-thread figures of this machine (run in a process started with OMP_NUM_THREADS=1): GEMV bandwidth,
    matmul rate, and the cost of one recorded op, from a decode step of a model too small for anything else
    to count."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 16384), dtype=np.float32)  # 256 MiB, streamed like decode weights
    x = rng.standard_normal((1, 4096), dtype=np.float32)
    a, b = rng.standard_normal((512, 1024), dtype=np.float32), rng.standard_normal((1024, 1024), dtype=np.float32)
    tiny = random_config(128, 2, 4, 2, 256)  # a model whose bytes and FLOPs are negligible: its time is per-op cost
    model = MiniMaxM2Model.random(tiny, max_seq_len=64)
    model.forward(np.zeros((1, 8), np.int64))
    ops = sum(c.ops * (tiny.num_hidden_layers if i == 1 else 1)
              for i, c in enumerate(record_units(tiny, model.layout, phase="decode", batch=1, seq=1, context=64,
                                                 dtype=np.dtype(np.float32))))

    def best(fn, repeat: int) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    skinny = rng.standard_normal((32, 4096), dtype=np.float32)  # 32 rows, as an expert-parallel rank's decode
    return {
        "memory_bytes_per_s": w.nbytes / best(lambda: x @ w, 5),
        "matmul_flops_per_s": 2 * 512 * 1024 * 1024 / best(lambda: a @ b, 5),
        "op_overhead_s": best(lambda: model.forward(np.zeros((1, 1), np.int64)), 20) / ops,
        "skinny_matmul_s": best(lambda: skinny @ w, 5),
        "skinny_matmul_flops": 2 * 32 * 4096 * 16384,
        "skinny_matmul_bytes": w.nbytes,
    }


def _gemv_seconds(start_at: float) -> float:
    """One process of the concurrent bandwidth probe: five GEMVs of 256 MiB from a common start time."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 16384), dtype=np.float32)
    x = rng.standard_normal((1, 4096), dtype=np.float32)
    while time.time() < start_at:
        time.sleep(0.001)
    begin = time.perf_counter()
    for _ in range(5):
        x @ w
    return (time.perf_counter() - begin) / 5


def concurrent_bandwidth(processes: int) -> float:
    """Bytes/s all of `processes` one-thread processes stream together (they share the memory bus)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        seconds = pool.map(_gemv_seconds, [time.time() + 5.0] * processes)
    return processes * 4096 * 16384 * 4 / max(seconds)


def collective_latency(backend, layout) -> dict[str, float]:
    """Seconds each small collective of each kind adds over all ranks (gloo), measured after the run the
    way the program meets them: between stretches of compute (a 16 MiB GEMV), as the extra time over the
    compute alone. Idle ranks answer faster than busy ones on this machine, so idle latency would
    understate what a collective costs inside a decode step."""
    x = np.ones((layout.world, 8), np.float32)
    rng = np.random.default_rng(layout.rank)
    w, v = rng.standard_normal((1024, 4096), dtype=np.float32), rng.standard_normal((1, 1024), dtype=np.float32)
    calls = {"all_reduce": lambda: backend.all_reduce(x, layout.world_groups),
             "all_gather": lambda: backend.all_gather(x, 0, layout.world_groups),
             "all_to_all": lambda: backend.all_to_all(x, 0, 0, layout.world_groups)}

    def seconds(step, repeat: int = 50) -> float:
        backend.all_reduce(x, layout.world_groups)
        start = time.perf_counter()
        for _ in range(repeat):
            step()
        return (time.perf_counter() - start) / repeat

    latency = {}
    for name, call in calls.items():
        compute = seconds(lambda: v @ w)
        latency[name] = max(0.0, seconds(lambda: (v @ w, call())) - compute)
    return latency


def cpu_share(machine: dict, world: int, latency: dict[str, float]) -> Hardware:
    """One rank's share of this machine when `world` ranks run at once on its cores (memory: what all
    busy cores stream together, measured, split over the ranks)."""
    share = min(world, CORES) / world
    busy = min(world, CORES)
    return Hardware(
        name=f"this machine, one of {world} ranks on {CORES} cores",
        memory_bytes_per_s=machine["bandwidth_by_processes"][str(busy)] / world,
        matmul_flops_per_s=machine["matmul_flops_per_s"] * share,
        op_overhead_s=machine["op_overhead_s"] / share,
        collective_latency_s=max(latency.values(), default=0.0),
        latency_by_collective=latency,
        local_link_bytes_per_s=machine["memory_bytes_per_s"] * share,
        remote_link_bytes_per_s=machine["memory_bytes_per_s"] * share,
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
    latency = collective_latency(backend, layout) if backend else {}
    costs = record_units(config, layout, phase="decode", batch=1, seq=1, context=context, dtype=np.dtype(np.float32))
    collectives.set_backend(backend)
    predicted = step_seconds(costs, config.num_hidden_layers, cpu_share(machine, layout.world, latency))
    if layout.rank == 0:
        print(MARK + json.dumps({
            "ranks": layout.world, "tp": layout.tp, "moe_tp": layout.moe_tp,
            "decode_ms": decode * 1e3, "predicted_ms": predicted * 1e3, "collective_latency_us": {k: v * 1e6 for k, v in latency.items()},
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
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--moe-tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--machine", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure_machine()))
        return
    if args.worker:
        worker(args.prompt_len, args.decode_steps, args.tp, args.moe_tp, json.loads(args.machine))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    machine = json.loads(subprocess.run([sys.executable, __file__, "--measure"], capture_output=True, text=True,
                                        check=True, env=env, cwd=ROOT).stdout)
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # for the spawned probe processes
    machine["bandwidth_by_processes"] = {str(n): concurrent_bandwidth(n) for n in range(1, CORES + 1)}
    rows = []
    for world, tp, moe_tp in (map(int, layout.split("x")) for layout in args.layouts):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), __file__,
             "--worker", "--tp", str(tp), "--moe-tp", str(moe_tp), "--prompt-len", str(args.prompt_len),
             "--decode-steps", str(args.decode_steps), "--machine", json.dumps(machine)],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode or not lines:
            sys.exit(f"{world}x{tp}x{moe_tp} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(lines[0][len(MARK):]))
    together = ", ".join(f"{n} at once {b / 1e9:.1f}" for n, b in machine["bandwidth_by_processes"].items())
    print(f"GEMV bandwidth of one-thread processes streaming together: {together} GB/s")
    print(f"machine (one thread): GEMV {machine['memory_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
          f"{machine['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, {machine['op_overhead_s'] * 1e6:.2f} us per NumPy op; "
          f"{CORES} cores")
    memory = machine["skinny_matmul_bytes"] / machine["memory_bytes_per_s"]
    matmul = machine["skinny_matmul_flops"] / machine["matmul_flops_per_s"]
    print(f"32-row matmul streaming 256 MiB of weights: {machine['skinny_matmul_s'] * 1e3:.1f} ms measured; "
          f"read {memory * 1e3:.1f} + matmul {matmul * 1e3:.1f} = {(memory + matmul) * 1e3:.1f} ms if one follows "
          f"the other, {max(memory, matmul) * 1e3:.1f} ms if they overlap: the projection adds them")
    print(f"medium config, batch 1, prompt {args.prompt_len}, {args.decode_steps} decode steps, float32")
    print(f"{'ranks':>5}{'tp':>4}{'moe_tp':>7}{'measured ms':>12}{'predicted ms':>13}{'ratio':>7}{'ar/ag/a2a us':>19}"
          f"{'expert MiB read/rank':>21}{'a2a KiB/tok/layer':>19}{'weights MiB/rank':>18}")
    for r in rows:
        print(f"{r['ranks']:>5}{r['tp']:>4}{r['moe_tp']:>7}{r['decode_ms']:>12.1f}{r['predicted_ms']:>13.1f}"
              f"{r['decode_ms'] / r['predicted_ms']:>7.2f}"
              f"{'/'.join(f'{v:.0f}' for v in r['collective_latency_us'].values()) or '-':>19}"
              f"{r['expert_read_bytes_per_step'] / 2**20:>21.1f}{r['a2a_bytes_per_token_layer'] / 1024:>19.1f}"
              f"{r['weight_bytes_rank0'] / 2**20:>18.1f}")


if __name__ == "__main__":
    main()
