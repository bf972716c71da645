"""Loading weights: a raw bf16 checkpoint against prepared files, on the medium config.

Builds the medium random model with transformers, saves it as a bf16 sharded checkpoint, then measures,
each in a fresh process (peak RSS from getrusage): loading the raw checkpoint (float32 resident),
prepare_weights.py (bf16 and float32), and loading each prepared directory (memory-mapped); with load
seconds, peak RSS, resident bytes per parameter and decode ms/token.

  python benchmarks/bench_weights.py [--dir /tmp/minimax_m2_bench_weights] [--decode-steps 8]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.medium_config import MEDIUM  # noqa: E402

MARK = "RESULT "


def build_checkpoint(path: Path) -> None:
    import torch
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(MiniMaxM2Config(**MEDIUM)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")


def measure(kind: str, source: Path, steps: int) -> dict:
    from minimax_m2 import MiniMaxM2Model

    begin = time.perf_counter()
    model = MiniMaxM2Model.from_pretrained(source) if kind == "raw" else MiniMaxM2Model.from_prepared(source)
    load = time.perf_counter() - begin
    resident = model.weights.nbytes()
    params = sum(a.size for a in [model.weights.embed, model.weights.final_norm, model.weights.lm_head]
                 + [a for layer in model.weights.layers for a in vars(layer).values()])
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 16))
    token = model.forward(prompt, all_logits=False)[:, -1].argmax(-1)[:, None]
    begin = time.perf_counter()
    for _ in range(steps):
        token = model.forward(token)[:, -1].argmax(-1)[:, None]
    decode = (time.perf_counter() - begin) / steps
    return {"load_s": load, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "resident_bytes": resident, "bytes_per_param": resident / params, "decode_ms": decode * 1e3}


def child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        sys.exit(f"{args} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[0][len(MARK):])


def prepare(checkpoint: Path, out: Path, dtype: str) -> dict:
    """prepare_weights.py's work in this process: seconds and peak RSS."""
    import prepare_weights
    from minimax_m2.weights.prepare_cli import run

    begin = time.perf_counter()
    run(prepare_weights.parse_args([str(checkpoint), "--out", str(out), "--dtype", dtype]))
    return {"seconds": time.perf_counter() - begin,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/minimax_m2_bench_weights"))
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--prepare", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        build_checkpoint(args.build)
        return
    if args.measure:
        print(MARK + json.dumps(measure(args.measure[0], Path(args.measure[1]), args.decode_steps)))
        return
    if args.prepare:
        print(MARK + json.dumps(prepare(Path(args.prepare[0]), Path(args.prepare[1]), args.prepare[2])))
        return
    checkpoint = args.dir / "checkpoint"
    if not (checkpoint / "config.json").is_file():  # built in a child, so torch does not count in later figures
        subprocess.run([sys.executable, __file__, "--build", str(checkpoint)], cwd=ROOT, check=True)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    print(f"medium config, bf16 checkpoint of {size / 1e9:.2f} GB in {checkpoint}")
    rows = [("raw checkpoint, float32 resident", child("--measure", "raw", str(checkpoint)), None)]
    for dtype in ("bfloat16", "float32"):
        out = args.dir / f"prepared-{dtype}"
        prep = child("--prepare", str(checkpoint), str(out), dtype)
        rows.append((f"prepared {dtype}", child("--measure", "prepared", str(out)), prep))
    print(f"{'weights':<34}{'load s':>8}{'peak RSS GB':>13}{'resident GB':>13}{'B/param':>9}{'RSS/resident':>14}"
          f"{'decode ms/tok':>15}{'prepare s':>11}{'prepare peak GB':>17}")
    for name, r, prep in rows:
        extra = f"{prep['seconds']:>11.1f}{prep['peak_rss_bytes'] / 1e9:>17.2f}" if prep else ""
        print(f"{name:<34}{r['load_s']:>8.2f}{r['peak_rss_bytes'] / 1e9:>13.2f}{r['resident_bytes'] / 1e9:>13.2f}"
              f"{r['bytes_per_param']:>9.2f}{r['peak_rss_bytes'] / r['resident_bytes']:>14.2f}"
              f"{r['decode_ms']:>15.1f}{extra}")


if __name__ == "__main__":
    main()
