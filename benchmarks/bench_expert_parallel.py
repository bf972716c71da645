"""Expert parallelism on CPU: decode ms/token beside the expert weight bytes each rank reads per decode
step, all_to_all bytes per token per layer and resident weight bytes per rank, for W = 1, 2, 4 ranks
(torchrun, gloo) and attention tp 1, 2 on the medium random config, batch 1.

  python benchmarks/bench_expert_parallel.py [--layouts 1x1 2x1 4x1 2x2 4x2] [--prompt-len 32] [--decode-steps 16]

Each layout (ranks x tp) is one torchrun launch of this script with --worker; rank 0 reports one JSON
line. The bytes a rank reads come from its recorded decode program (every rank runs the same one).
The ranks share this machine's 2 cores and one memory bus (torchrun gives each one BLAS thread), so
wall time at W > 1 measures the sum of all ranks' traffic; bytes per rank are what carry over to
separate NeuronCores.
"""

import argparse
import json
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
from minimax_m2.nkipy_semantics import EmulatedCollectives, LoopbackCollectives, trace_unit  # noqa: E402
from minimax_m2.program import program_units  # noqa: E402

MARK = "RESULT "


def expert_bytes_per_step(model: MiniMaxM2Model, backend) -> int:
    """Expert weight bytes this rank's decode program reads per token, over all layers (recorded, not run)."""
    layer = program_units(model.config, model.layout, model.weights, model.rope, phase="decode", batch=1, seq=1,
                          max_seq_len=model.max_seq_len, position=model.max_seq_len - 1)[1]
    collectives.set_backend(EmulatedCollectives(LoopbackCollectives()))
    try:
        program, _ = trace_unit(layer.fn, layer.inputs, layer.constants, ("w13", "w2"), dry=True)
    finally:
        collectives.set_backend(backend)
    return program.weight_bytes() * model.config.num_hidden_layers


def worker(prompt_len: int, steps: int, tp: int) -> None:
    layout, backend = start(tp=tp, timeout_seconds=600)
    config = MiniMaxM2Config.from_dict(MEDIUM)
    model = MiniMaxM2Model.random(config, seed=0, max_seq_len=prompt_len + steps + 1, layout=layout)
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len))
    token = model.forward(prompt, all_logits=False)[:, -1].argmax(-1)[:, None]
    sent_before = backend.all_to_all_bytes if backend else 0
    begin = time.perf_counter()
    for _ in range(steps):
        token = model.forward(token)[:, -1].argmax(-1)[:, None]
    decode = (time.perf_counter() - begin) / steps
    sent = (backend.all_to_all_bytes if backend else 0) - sent_before
    if layout.rank == 0:
        print(MARK + json.dumps({
            "ranks": layout.world,
            "tp": layout.tp,
            "expert_read_bytes_per_step": expert_bytes_per_step(model, backend),
            "decode_ms": decode * 1e3,
            "a2a_bytes_per_token_layer": sent / steps / config.num_hidden_layers,
            "weight_bytes_rank0": model.weights.nbytes(),
            "expert_bytes_rank0": sum(w.w13.nbytes + w.w2.nbytes for w in model.weights.layers),
            "experts_rank0": model.weights.layers[0].w13.shape[0],
        }), flush=True)
    if backend:
        backend.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "4x1", "2x2", "4x2"], help="RANKSxTP")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.prompt_len, args.decode_steps, args.tp)
        return
    rows = []
    for world, tp in (map(int, layout.split("x")) for layout in args.layouts):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), __file__,
             "--worker", "--tp", str(tp), "--prompt-len", str(args.prompt_len), "--decode-steps", str(args.decode_steps)],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode or not lines:
            sys.exit(f"W={world} failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(lines[0][len(MARK):]))
    base = rows[0]
    print(f"medium config, batch 1, prompt {args.prompt_len}, {args.decode_steps} decode steps, float32")
    print(f"{'ranks':>5}{'tp':>4}{'experts/rank':>14}{'decode ms/tok':>15}{'expert MiB read/step':>22}"
          f"{'all ranks':>11}{'a2a KiB/tok/layer':>19}{'weights MiB/rank':>18}{'of which experts':>18}{'vs W=1':>8}")
    for r in rows:
        read = r["expert_read_bytes_per_step"] / 2**20
        print(f"{r['ranks']:>5}{r['tp']:>4}{r['experts_rank0']:>14}{r['decode_ms']:>15.2f}{read:>22.1f}"
              f"{read * r['ranks']:>11.1f}{r['a2a_bytes_per_token_layer'] / 1024:>19.1f}"
              f"{r['weight_bytes_rank0'] / 2**20:>18.1f}{r['expert_bytes_rank0'] / 2**20:>18.1f}"
              f"{r['expert_bytes_rank0'] / base['expert_bytes_rank0']:>7.2f}x")


if __name__ == "__main__":
    main()
