"""The warm-up of a trn2 host, measured with a stand-in compiler: the real compile set spread over 64 ranks.

Builds the engine `run_example.py --mode plan` plans for these flags (the real MiniMax-M2 and the README's
serving flags by default; no weight is loaded), then, with `minimax_m2.device.stand_in_compiler` taking
`--seconds` a compile (nkipy's NEFF naming and cache; the Neuron compiler's real time is not known here):
  1. a first start: `--ranks` ranks (threads) each compile their share into one build directory
     (`NeuronRunner.prepare`); compiles in all against distinct programs, the most a rank compiles against
     ceil(programs / ranks) + 1, wall seconds against programs / ranks + 5;
  2. a restart on that directory: compiles (target 0), and a start with `--changed-flags` added on it:
     compiles against the programs the first set lacks;
  3. `--mode compile` ahead of time into a second directory (`--compile-jobs` processes), then a start on
     it: compiles (target 0).

  python benchmarks/bench_warm_up.py [--seconds 1] [--ranks 64] [--compile-jobs 32] [plan flags ...]
"""

import argparse
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run_example  # noqa: E402
from minimax_m2.device.neuron import NeuronRunner, compile_ahead  # noqa: E402
from minimax_m2.device.nkipy_semantics import LoopbackCollectives  # noqa: E402
from minimax_m2.device.program import Unit  # noqa: E402
from minimax_m2.device.stand_in_compiler import StandInCompiler  # noqa: E402
from minimax_m2.plan_mode import print_plan  # noqa: E402

SERVING_FLAGS = ["--config", "real", "--ep", "64", "--tp", "8", "--moe-tp", "64", "--device", "neuron",
                 "--max-num-seqs", "32", "--prefill-chunk", "2048", "--max-seq-len", "196608"]
RUNTIME = (StandInCompiler, None, LoopbackCollectives())  # nothing is loaded onto a device here


def start(units: list[Unit], build: Path, ranks: int) -> tuple[int, int, float]:
    """Every rank prepares its share into `build` at once -> (compiles, most by one rank, wall seconds)."""
    StandInCompiler.reset()
    runners = [NeuronRunner(build, runtime=RUNTIME) for _ in range(ranks)]
    began = time.perf_counter()
    with ThreadPoolExecutor(ranks) as pool:
        list(pool.map(lambda r: runners[r].prepare(units, r, ranks), range(ranks)))
    return sum(StandInCompiler.compiled.values()), max(StandInCompiler.by_thread.values(), default=0), \
        time.perf_counter() - began


def planned_units(flags: list[str]) -> list[Unit]:
    """The programs of the run `--mode plan` plans for these flags (its plan printed)."""
    args = run_example.parse_args(["--mode", "plan", *flags])
    args.dtype, args.fp8 = args.dtype or "bfloat16", args.fp8 or "dequantize"  # as --mode plan resolves them
    return list(print_plan(args).programs().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="the stand-in's seconds a compile")
    parser.add_argument("--ranks", type=int, default=64, help="ranks of one host sharing the build directory")
    parser.add_argument("--compile-jobs", type=int, default=32, help="processes of the ahead-of-time compile")
    parser.add_argument("--changed-flags", default="--speculative ngram", help="plan flags a restart adds")
    ours, plan_flags = parser.parse_known_args()
    units = planned_units([*SERVING_FLAGS, *plan_flags])
    changed = planned_units([*SERVING_FLAGS, *plan_flags, *ours.changed_flags.split()])
    programs, ranks = len(units), ours.ranks
    StandInCompiler.compile_seconds = ours.seconds
    with tempfile.TemporaryDirectory() as tmp:
        compiles, most, wall = start(units, Path(tmp) / "build", ranks)
        print(f"\nfirst start, {ranks} ranks, {ours.seconds:g} s a compile: {compiles} compiles of {programs} "
              f"distinct programs; at most {most} by one rank (cap {math.ceil(programs / ranks) + 1}); "
              f"{wall:.1f} s (target {programs / ranks + 5:.1f} s = programs / ranks + 5)")
        compiles, _, wall = start(units, Path(tmp) / "build", ranks)
        print(f"restart on the same build directory: {compiles} compiles, {wall:.1f} s")
        new = len({u.key() for u in changed} - {u.key() for u in units})
        compiles, _, wall = start(changed, Path(tmp) / "build", ranks)
        print(f"restart with {ours.changed_flags}: {compiles} compiles of {len(changed)} programs, {new} of them not "
              f"in the first set; {wall:.1f} s")
        began = time.perf_counter()
        compile_ahead(units, Path(tmp) / "ahead", ours.compile_jobs, runtime=RUNTIME)
        ahead = len(list((Path(tmp) / "ahead").glob("*/*.neff")))
        print(f"ahead of time, {ours.compile_jobs} processes: {ahead} NEFFs in {time.perf_counter() - began:.1f} s")
        compiles, _, wall = start(units, Path(tmp) / "ahead", ranks)
        print(f"start on the ahead-of-time directory: {compiles} compiles, {wall:.1f} s")


if __name__ == "__main__":
    main()
