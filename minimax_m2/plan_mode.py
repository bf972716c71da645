"""`run_example.py --mode plan`: will this run fit? The memory plan of one rank and, when it fits, the programs it
compiles, for a config and layout, without loading a weight; exit 0 when it fits, one `error:` line and 2 when
not."""

import argparse
import time
from collections import Counter

import numpy as np

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.memory import (
    NEURON_CORE_HBM,
    available_memory,
    check_fits,
    engine_plan,
    kv_block_bytes,
    pool_blocks,
)
from minimax_m2.device.neuron import compile_ahead, nkipy_runtime
from minimax_m2.device.roofline import TRN2, expert_cost, fastest_moe_tp
from minimax_m2.device.step import KV_BLOCK
from minimax_m2.device.warm_up import warm_up_seconds
from minimax_m2.experts import parse_experts, select_experts
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.parallel import ParallelLayout
from minimax_m2.run import random_config
from minimax_m2.serving.engine import Engine
from minimax_m2.weights.model_weights import model_dtype, zero_model_weights
from minimax_m2.weights.prepare import prepared_fp8, prepared_layout

SERVE_SLOTS = 8  # --max-num-seqs of serve mode when it is not given


HOST_RANKS = 64  # a trn2.48xlarge's NeuronCores at LNC=2, one host: ranks that share a build directory
ASSUMED_COMPILE_SECONDS = (("30 s", 30), ("2 min", 120), ("5 min", 300))


def keeps_fp8(args: argparse.Namespace, config: MiniMaxM2Config) -> bool:
    """Whether the run holds FP8 experts as codes: prepared so (--weights), or --fp8 keep and a checkpoint
    stored in FP8."""
    if args.weights:
        return prepared_fp8(args.weights)
    return args.fp8 == "keep" and config.fp8_block_size is not None


def plan_config(args: argparse.Namespace) -> tuple[MiniMaxM2Config, list[int], dict | None, str]:
    """(config, experts loaded, prepared layout or None, where the config comes from)."""
    if args.config == "real":
        config = MiniMaxM2Config(fp8_block_size=(128, 128))  # released as FP8, 128 x 128 blocks
        return config, select_experts(config, parse_experts(args.experts, config.num_local_experts)), None, \
            "MiniMax-M2 as released"
    if args.weights:
        config, prepared, experts = prepared_layout(args.weights)
        return config, experts, prepared, str(args.weights)
    if args.checkpoint:
        config = MiniMaxM2Config.from_pretrained(args.checkpoint)
        return config, select_experts(config, parse_experts(args.experts, config.num_local_experts)), None, \
            str(args.checkpoint)
    config = random_config(args.hidden_size, args.num_layers, args.num_experts, args.experts_per_token,
                           args.vocab_size)
    return config, select_experts(config, parse_experts(args.experts, config.num_local_experts)), None, \
        "a random MiniMax-M2 of the random-mode flags"


def serving_engine(config: MiniMaxM2Config, experts: list[int], layout: ParallelLayout, dtype: np.dtype, slots: int,
                   prefill_chunk: int, max_seq_len: int, device: str, kv_blocks: int, fp8: bool,
                   spread_from: int, speculative: int = 0) -> Engine:
    """The serving engine of these settings over a model of zeros that is never touched (its pages are never
    written, so it takes no memory): its shape set and programs are those of the run (speculative: draft
    tokens a row, whose verify steps are programs too)."""
    weights = zero_model_weights(config, experts, layout, dtype, fp8=fp8)
    model = MiniMaxM2Model(config, weights, experts, max_seq_len, layout)
    if device == "neuron":
        model.expert_cost = expert_cost(TRN2, weights.layers[0])
    return Engine(model, max_num_seqs=slots, prefill_chunk=prefill_chunk, keep_logits=False, kv_blocks=kv_blocks,
                  spread_from=spread_from, speculative=speculative)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; raise ValueError (one line, exit 2) when it does not fit."""
    print_plan(args)
    return 0


def run_compile(args: argparse.Namespace, runtime: tuple | None = None) -> int:
    """--mode compile: print the plan (refused when it does not fit), then trace and compile every program of
    the run into --build-dir with nkipy's compiler (`runtime`: nkipy's by default), --compile-jobs at once,
    with a bar; print the count, the seconds in all and the slowest programs. A NeuronCore host starting on
    that directory then compiles nothing. Every rank's programs are rank 0's (rank values are inputs), so
    one host compiles them all."""
    engine = print_plan(args)
    runtime = runtime or nkipy_runtime()  # refused here, before any process is forked, where nkipy is missing
    units = list(engine.programs().values())
    jobs = min(args.compile_jobs, len(units))
    start = time.perf_counter()
    timed = compile_ahead(units, args.build_dir, jobs, runtime=runtime)
    slowest = sorted(timed, key=lambda t: -t[1])[:5]
    print(f"compiled {len(units)} programs into {args.build_dir} in {time.perf_counter() - start:.1f} s, {jobs} at "
          f"once ({sum(t for _, t in timed):.1f} s of compiling in all); slowest: "
          + ", ".join(f"{unit.name} {seconds:.1f} s" for unit, seconds in slowest))
    return 0


def print_plan(args: argparse.Namespace) -> Engine:
    """Print the plan and the compile set; raise ValueError when it does not fit -> the run's engine (over
    weights of zeros, never run)."""
    config, experts, prepared, source = plan_config(args)
    slots = args.max_num_seqs or SERVE_SLOTS
    tp = prepared["tp"] if prepared else args.tp
    moe_tp = prepared["moe_tp"] if prepared else args.moe_tp or fastest_moe_tp(
        config, args.ep, tp, slots, args.max_seq_len, len(experts))
    layout = ParallelLayout(args.ep, tp, 0, moe_tp=moe_tp)
    layout.check(config, len(experts))
    dtype = model_dtype(args.dtype)
    chunk = min(args.prefill_chunk, args.max_seq_len)
    available, where = (NEURON_CORE_HBM, "one NeuronCore's HBM (trn2, LNC=2)") if args.device == "neuron" else \
        available_memory("cpu", layout.world)
    sizes = dict(slots=slots, prefill_chunk=chunk, max_seq_len=args.max_seq_len, spread_from=args.spread_from)
    fp8 = keeps_fp8(args, config)
    kv_blocks = args.kv_blocks or pool_blocks(config, layout, len(experts), dtype, available=available,
                                              device=args.device, fp8=fp8, **sizes)
    plan = engine_plan(config, layout, len(experts), dtype, kv_blocks=kv_blocks, fp8=fp8, **sizes)
    per_token = kv_block_bytes(config, layout, dtype) / KV_BLOCK
    print(f"config: {source}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{len(experts)} of {config.num_local_experts} experts (top-{config.num_experts_per_tok})")
    print(f"layout: {layout.world} ranks, attention tp {layout.tp} ({layout.dp} attention groups), experts sliced "
          f"over {layout.moe_tp} ranks (moe_tp) in {layout.moe_ep} groups; {np.dtype(dtype).name}"
          f"{', FP8 experts kept as codes' if fp8 else ''}; "
          f"--max-num-seqs {slots} --prefill-chunk {chunk} --max-seq-len {args.max_seq_len}")
    print(f"memory plan per rank: {plan.describe()}")
    tokens = kv_blocks * KV_BLOCK
    print(f"KV pool: {kv_blocks:,} blocks of {KV_BLOCK} positions per attention group: {tokens:,} tokens per group, "
          f"{layout.dp * tokens:,} per instance, {per_token / 1024:.1f} KiB per token per rank; a request holds up to "
          f"{args.max_seq_len:,}")
    check_fits(plan, available, where, args.max_seq_len)
    print(f"fits: {plan.total / 2**30:.2f} of {available / 2**30:.2f} GiB ({where})")
    engine = serving_engine(config, experts, layout, dtype, slots, chunk, args.max_seq_len, args.device, kv_blocks, fp8,
                            args.spread_from, args.num_speculative_tokens if args.speculative else 0)
    shapes, programs = len(engine.shapes.shapes()), Counter(unit.name for unit in engine.programs().values())
    count = sum(programs.values())
    print(f"compile set per rank: {shapes} step shapes, {count} programs ("
          + ", ".join(f"{n} {name}" for name, n in sorted(programs.items())) + ")")
    if args.device == "neuron":
        ranks = min(layout.world, HOST_RANKS)
        times = [(label, *warm_up_seconds(count, ranks, seconds)) for label, seconds in ASSUMED_COMPILE_SECONDS]
        print(f"warm-up compiles at an ASSUMED {' / '.join(label for label, *_ in times)} a program (the Neuron "
              f"compiler's time is not measured here): one rank after another "
              + " / ".join(_duration(serial) for _, serial, _ in times)
              + f"; spread over the {ranks} ranks of a host " + " / ".join(_duration(spread) for *_, spread in times))
    return engine


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
