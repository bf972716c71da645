"""What run_example.py runs, once its arguments are parsed: checks first, then the model."""

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kernels.collectives import all_gather
from minimax_m2 import checks
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.memory import available_memory, check_fits, engine_plan, pool_blocks
from minimax_m2.device.neuron import NeuronRunner, compile_share, run_on
from minimax_m2.device.roofline import fastest_moe_tp
from minimax_m2.device.step import KV_BLOCK
from minimax_m2.distributed import CollectiveError, on_launcher_exit, rank, start, world_size
from minimax_m2.experts import parse_experts, select_experts
from minimax_m2.generation import checkpoint_defaults, resolve_sampling
from minimax_m2.model import MiniMaxM2Model, check_vocabulary
from minimax_m2.parallel import ParallelLayout
from minimax_m2.plan_mode import keeps_fp8, run_compile, run_plan
from minimax_m2.run import (
    engine_generate,
    kernel_checks,
    load_tokenizer,
    parse_ids,
    random_config,
    report,
    report_parallel,
    run_kernel_checks,
    write_outputs,
)
from minimax_m2.serving.chat import format_chat
from minimax_m2.serving.detokenize import IncrementalDetokenizer
from minimax_m2.serving.engine import MAX_SPECULATIVE, Engine
from minimax_m2.serving.executor import Executor
from minimax_m2.serving.lockstep import PlanSender, follow
from minimax_m2.serving.parsers import parse_output
from minimax_m2.weights.model_weights import model_dtype
from minimax_m2.weights.prepare import prepared_layout


def _check_writable(flag: str, path: Path | None) -> None:
    """Open the output for appending now (removing it again if it did not exist), so a path that cannot
    be written fails before any work."""
    if path is None:
        return
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write there ({err.strerror})") from err
    if not existed:
        path.unlink(missing_ok=True)


def _check_flags(args: argparse.Namespace) -> None:
    """Numbers given on the command line, by range, before any work."""
    checks.number("--collective-timeout", args.collective_timeout, 0, 1e6)
    checks.integer("--max-seq-len", args.max_seq_len)
    checks.integer("--max-new-tokens", args.max_new_tokens)
    for flag, value in (("--batch", args.batch), ("--prompt-len", args.prompt_len)):
        checks.integer(flag, value)
    checks.integer("--port", args.port, 0, 65535)
    checks.integer("--prefill-chunk", args.prefill_chunk)
    checks.integer("--compile-jobs", args.compile_jobs, 1, 4096)
    checks.integer("--num-speculative-tokens", args.num_speculative_tokens, 1, MAX_SPECULATIVE)
    checks.integer("--max-request-bytes", args.max_request_bytes, 1 << 10, 1 << 34)
    if args.max_num_seqs is not None:
        checks.integer("--max-num-seqs", args.max_num_seqs, 1, 4096)
    if args.capacity_factor is not None:
        checks.number("--capacity-factor", args.capacity_factor, 0, 1e6)
    if args.kv_blocks is not None:
        checks.integer("--kv-blocks", args.kv_blocks, 1, 1 << 26)
    checks.integer("--spread-from", args.spread_from, 0, 1 << 30)


def _chat_messages(turns: list[str]) -> list[dict]:
    messages = []
    for turn in turns:
        if turn.startswith("system:"):
            messages.insert(0, {"role": "system", "content": turn.removeprefix("system:").strip()})
        elif turn.strip():
            messages.append({"role": "user", "content": turn})
        else:
            raise ValueError("--chat turns must not be empty")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("--chat needs at least one user turn")
    return messages


def _source(args: argparse.Namespace) -> Path:
    """The --checkpoint or --weights directory of generate and serve mode (exactly one of them)."""
    if (args.checkpoint is None) == (args.weights is None):
        raise ValueError(f"--mode {args.mode} needs --checkpoint DIR or --weights DIR (one of them)")
    return args.checkpoint or args.weights


def _check_memory(config: MiniMaxM2Config, layout: ParallelLayout, num_experts: int, dtype: np.dtype, device: str,
                  slots: int, prefill_chunk: int, kept_logits: int, max_seq_len: int, kv_blocks: int | None,
                  leader: bool, fp8: bool, spread_from: int) -> int:
    """Print this rank's memory plan and refuse the run, before any allocation, when it cannot fit; the KV
    pool's blocks per attention group (`kv_blocks`, else `pool_blocks`)."""
    available, where = available_memory(device, min(layout.world, world_size()))
    sizes = dict(slots=slots, prefill_chunk=prefill_chunk, max_seq_len=max_seq_len, kept_logits=kept_logits, fp8=fp8,
                 spread_from=spread_from)
    kv_blocks = kv_blocks or pool_blocks(config, layout, num_experts, dtype, available=available, device=device,
                                         **sizes)
    plan = engine_plan(config, layout, num_experts, dtype, kv_blocks=kv_blocks, **sizes)
    check_fits(plan, available, where, max_seq_len)
    if leader:
        print(f"memory plan per rank: {plan.describe()} of {available / 2**30:.1f} GiB ({where})")
    return kv_blocks


def _agreed(kv_blocks: int, layout: ParallelLayout) -> int:
    """The smallest pool any rank planned (each plans from its own view of the memory left)."""
    return int(np.min(all_gather(np.array([kv_blocks], np.int32), 0, layout.world_groups)))


def _load_model(args: argparse.Namespace, layout: ParallelLayout, experts: list[int] | None,
                progress: bool, runner: NeuronRunner | None) -> MiniMaxM2Model:
    """The model of --weights (prepared, memory-mapped, checked) or of --checkpoint, run by `runner`
    (default: NumPy on this CPU)."""
    if args.weights:
        model = MiniMaxM2Model.from_prepared(args.weights, max_seq_len=args.max_seq_len, layout=layout,
                                             verify=not args.no_verify)
    else:
        model = MiniMaxM2Model.from_pretrained(args.checkpoint, experts=experts, max_seq_len=args.max_seq_len,
                                               layout=layout, dtype=args.dtype, progress=progress,
                                               keep_fp8=args.fp8 == "keep")
    return run_on(model, runner)


def _config_and_experts(args: argparse.Namespace, source: Path) -> tuple[MiniMaxM2Config, list[int], dict | None]:
    """The config, the experts a run loads and, for prepared weights, their layout."""
    if args.weights:
        if args.experts:
            raise ValueError("--experts has no effect with --weights: the experts were chosen when preparing")
        config, prepared, experts = prepared_layout(source)
        return config, experts, prepared
    config = MiniMaxM2Config.from_pretrained(source)
    return config, select_experts(config, parse_experts(args.experts, config.num_local_experts)), None


def _new_engine(args: argparse.Namespace, model: MiniMaxM2Model, slots: int, kv_blocks: int,
                executor: Executor | None = None) -> Engine:
    return Engine(model, max_num_seqs=slots, prefill_chunk=args.prefill_chunk, executor=executor,
                  prefix_reuse=not args.no_prefix_reuse,
                  speculative=args.num_speculative_tokens if args.speculative else 0,
                  keep_logits=args.mode != "serve" and args.dump_logits is not None, kv_blocks=kv_blocks,
                  spread_from=args.spread_from)


def _compile_share(engine: Engine, runner: NeuronRunner | None, leader: bool) -> None:
    """On a device: this rank compiles its share of the engine's programs (`compile_share`)."""
    if runner is None:
        return
    units = list(engine.programs().values())
    start = time.perf_counter()
    timed, ranks = compile_share(runner, units, engine.model.layout.world_groups)
    if leader:
        print(f"compiled {len(units)} programs over the {ranks} ranks of this host ({len(timed)} here) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)


def _engine(args: argparse.Namespace, model: MiniMaxM2Model, slots: int, kv_blocks: int, leader: bool,
            runner: NeuronRunner | None, executor: Executor | None = None) -> Engine:
    """The engine over `model`, warmed up: schedules chosen and, on a device, every program compiled (each
    rank its share) and every step shape run once (after which a shape outside the set is refused)."""
    engine = _new_engine(args, model, slots, kv_blocks, executor)
    shapes = engine.shapes.shapes()
    if leader:
        print(f"engine: {slots} requests and {kv_blocks:,} KV blocks of {KV_BLOCK} positions per attention group, "
              f"prefill chunks of {engine.shapes.prefill_chunk} "
              f"tokens; {len(shapes)} step shapes (decode: {list(engine.shapes.decode_rows)} rows per group, "
              f"{len(engine.shapes.decode_buckets)} buckets of real rows x tile counts; prefill rows "
              f"{list(engine.shapes.prefill_rows)} x tokens {list(engine.shapes.prefill_tokens)}, attended lengths "
              f"{list(engine.shapes.kv_lengths)})", flush=True)
    _compile_share(engine, runner, leader)
    start = time.perf_counter()
    steps = engine.warm_up(every_shape=runner is not None)
    if runner is not None:
        runner.frozen = True
        if leader:
            print(f"warm-up: {len(engine.shapes.shapes())} step shapes loaded and run with each lm_head variant "
                  f"({steps} steps, {runner.compiled} programs) in {time.perf_counter() - start:.1f} s", flush=True)
    return engine


def serve_checkpoint(args: argparse.Namespace, runner: NeuronRunner | None) -> int:
    """--mode serve: a checkpoint or prepared weights with a tokenizer, behind the engine and one OpenAI
    endpoint; over W ranks (torchrun), rank 0 serves and sends every step's plan to the others."""
    from minimax_m2.serving.server import Limits, ServedModel, make_server

    source = _source(args)
    tokenizer = load_tokenizer(source, "--mode serve")
    defaults, warnings = resolve_sampling(checkpoint_defaults(source), args.max_new_tokens, args.temperature,
                                          args.top_k, args.top_p, args.seed)
    config, experts, prepared = _config_and_experts(args, source)
    _check_ranks(args)
    tp, moe_tp = _layout_choice(args, config, prepared, len(experts), args.max_num_seqs or 8)
    slots = args.max_num_seqs or 8
    planned = ParallelLayout(args.ep, tp, rank(), args.capacity_factor, moe_tp)
    planned.check(config, len(experts))
    kv_blocks = _check_memory(config, planned, len(experts), model_dtype(args.dtype), args.device, slots,
                              args.prefill_chunk, 0, args.max_seq_len, args.kv_blocks, rank() == 0,
                              keeps_fp8(args, config), args.spread_from)
    layout, backend = start(tp, args.collective_timeout, args.capacity_factor, moe_tp)
    kv_blocks = _agreed(kv_blocks, layout)
    leader = layout.rank == 0
    for warning in warnings if leader else []:
        print(f"warning: {warning}", file=sys.stderr)
    model = _load_model(args, layout, experts, progress=leader, runner=runner)
    model.schedule_cost()  # every rank, before any plan: its measurement is averaged over the ranks
    if not leader:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 drains, then tells this rank to stop
        return _follow(args, model, slots, kv_blocks, runner, backend)
    sender = PlanSender(model, backend) if backend else None
    engine = _engine(args, model, slots, kv_blocks, leader, runner, sender)
    if sender:
        sender.heartbeat()  # answered only once every rank has loaded (and warmed up with rank 0)
        print(f"all {layout.world} ranks loaded and ready", flush=True)
    name = args.served_model_name or source.resolve().name
    served = ServedModel(name, engine, tokenizer, defaults, args.max_seq_len, source, model.config.vocab_size)
    server = make_server(served, args.host, args.port, Limits(max_body_bytes=args.max_request_bytes))
    engine.on_failure = lambda message: setattr(server, "should_exit", True)
    on_launcher_exit(_stop_serving)
    engine.start()
    try:
        server.run()
    finally:
        engine.stop()
    if engine.failure:
        raise CollectiveError(f"serving stopped: {engine.failure}")
    if backend:
        backend.close()
    return 0


def _follow(args: argparse.Namespace, model: MiniMaxM2Model, slots: int, kv_blocks: int, runner: NeuronRunner | None,
            backend: Any) -> int:
    """Every rank but 0: its share of rank 0's programs compiled, then every plan rank 0 sends run until it
    says stop (one scheduler decides every step, timing-driven choices included, so the ranks never differ)."""
    _compile_share(_new_engine(args, model, slots, kv_blocks), runner, False)  # rank 0's engine, never started
    follow(model, backend)
    backend.close()
    return 0


def _stop_serving(launcher: int) -> None:
    """The launcher is gone: shut down as on SIGTERM (requests in flight end, then every rank stops)."""
    os.kill(os.getpid(), signal.SIGTERM)
    print(f"error: the launcher (pid {launcher}) is gone: ending every request and stopping every rank",
          file=sys.stderr, flush=True)


def _check_ranks(args: argparse.Namespace) -> None:
    if world_size() == 1 and (args.ep > 1 or args.tp > 1):
        raise ValueError(f"--ep {args.ep} --tp {args.tp} need {max(args.ep, args.tp)} ranks: launch with "
                         f"torchrun --nproc-per-node {args.ep} run_example.py ...")
    if world_size() != args.ep:
        raise ValueError(f"--ep {args.ep} but {world_size()} ranks are running: "
                         f"launch with torchrun --nproc-per-node {args.ep}")


def _layout_choice(args: argparse.Namespace, config: MiniMaxM2Config, prepared: dict | None, num_experts: int,
                   batch: int) -> tuple[int, int]:
    """(tp, moe_tp): the prepared weights', or the flags' (moe_tp by default the projection's fastest)."""
    if prepared:
        return prepared["tp"], prepared["moe_tp"]
    return args.tp, args.moe_tp or fastest_moe_tp(config, args.ep, args.tp, batch, args.max_seq_len, num_experts)


def main(args: argparse.Namespace) -> int:
    if args.mode == "test":
        import test_kernels

        return 0 if run_kernel_checks(kernel_checks(test_kernels)) else 1
    _check_flags(args)
    if args.fp8 and args.weights:
        raise ValueError("--fp8 has no effect with --weights: the experts' format was chosen when preparing "
                         "(prepare_weights.py --fp8)")
    args.fp8 = args.fp8 or "dequantize"
    if args.mode == "compile":
        args.device = "neuron"
    if args.mode in ("plan", "compile"):
        args.dtype = args.dtype or ("bfloat16" if args.device == "neuron" else "float32")
        return run_plan(args) if args.mode == "plan" else run_compile(args)
    if args.config:
        raise ValueError("--config real is for --mode plan and --mode compile (the other modes need weights: "
                         "--checkpoint or --weights)")
    runner = NeuronRunner(args.build_dir, rank()) if args.device == "neuron" else None
    args.dtype = args.dtype or ("bfloat16" if runner else "float32")
    if args.mode == "serve":
        return serve_checkpoint(args, runner)
    if rank() == 0:  # the rank that writes them
        for flag, path in (("--output-json", args.output_json), ("--dump-logits", args.dump_logits)):
            _check_writable(flag, path)
    _check_ranks(args)
    warnings, tokenizer, source, prepared, messages = [], None, None, None, None
    if args.mode == "random":
        if args.checkpoint or args.weights:
            warnings.append("--checkpoint / --weights have no effect in random mode")
        if args.prompt is not None or args.chat:
            raise ValueError("--prompt and --chat need a checkpoint's tokenizer: use --mode generate")
        config = random_config(args.hidden_size, args.num_layers, args.num_experts, args.experts_per_token,
                               args.vocab_size)
        experts = select_experts(config, parse_experts(args.experts, config.num_local_experts))
        rows = parse_ids(args.prompt_ids) if args.prompt_ids else None
        lengths = [len(r) for r in rows] if rows else [args.prompt_len] * args.batch
    else:
        source = _source(args)
        config, experts, prepared = _config_and_experts(args, source)
        given = [flag for flag, value in (("--prompt-ids", args.prompt_ids), ("--prompt", args.prompt),
                                          ("--chat", args.chat)) if value is not None]
        if len(given) != 1:
            raise ValueError("--mode generate needs exactly one of --prompt-ids, --prompt or --chat")
        if args.prompt_ids:
            rows = parse_ids(args.prompt_ids)
        else:
            tokenizer = load_tokenizer(source, given[0])
            if args.chat:
                messages = _chat_messages(args.chat)
                text = format_chat(source, messages)
            elif not args.prompt.strip():
                raise ValueError("--prompt is empty")
            else:
                text = args.prompt
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{given[0]} is not valid UTF-8 text (the shell passed bytes that are not)") from None
            rows = [tokenizer.encode(text, add_special_tokens=False).ids]
        lengths = [len(r) for r in rows]
    sampling, more = resolve_sampling(checkpoint_defaults(source), args.max_new_tokens, args.temperature, args.top_k,
                                      args.top_p, args.seed)
    warnings += more
    if args.max_seq_len > config.max_position_embeddings:
        warnings.append(f"--max-seq-len {args.max_seq_len} exceeds the model's max_position_embeddings "
                        f"{config.max_position_embeddings}")
    if max(lengths) + sampling.max_new_tokens - 1 > args.max_seq_len:
        raise ValueError(f"a prompt of {max(lengths)} tokens + {sampling.max_new_tokens} new tokens exceeds "
                         f"--max-seq-len {args.max_seq_len}")
    if rows:
        check_vocabulary(np.array([t for r in rows for t in r]), config.vocab_size)

    tp, moe_tp = _layout_choice(args, config, prepared, len(experts), len(lengths))
    planned = ParallelLayout(args.ep, tp, rank(), args.capacity_factor, moe_tp)
    planned.check(config, len(experts))
    slots = args.max_num_seqs or planned.rows_per_group(len(lengths))
    kept = sum(n + sampling.max_new_tokens - 1 for n in lengths) if args.dump_logits else 0
    kv_blocks = _check_memory(config, planned, len(experts), model_dtype(args.dtype), args.device, slots,
                              args.prefill_chunk, kept, args.max_seq_len, args.kv_blocks, rank() == 0,
                              keeps_fp8(args, config), args.spread_from)
    rng = np.random.default_rng(args.model_seed)
    prompts = rows or rng.integers(0, config.vocab_size, (len(lengths), lengths[0])).tolist()
    layout, backend = start(tp, args.collective_timeout, args.capacity_factor, moe_tp)
    kv_blocks = _agreed(kv_blocks, layout)
    leader = layout.rank == 0
    for warning in warnings if leader else []:
        print(f"warning: {warning}", file=sys.stderr)
    if args.mode == "random":
        model = run_on(MiniMaxM2Model.random(config, seed=args.model_seed, experts=experts,
                                             max_seq_len=args.max_seq_len, layout=layout, dtype=args.dtype,
                                             progress=leader), runner)
        if leader:
            print(f"random MiniMax-M2: {config}")
    else:
        model = _load_model(args, layout, experts, progress=leader, runner=runner)
    model.schedule_cost()  # every rank, before any plan: its measurement is averaged over the ranks
    if not leader:
        return _follow(args, model, slots, kv_blocks, runner, backend)
    sender = PlanSender(model, backend) if backend else None
    engine = _engine(args, model, slots, kv_blocks, leader, runner, sender)
    detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None and len(prompts) == 1 else None

    def stream(row: int, token: int) -> None:
        print(detokenizer.feed(token), end="", flush=True)

    result = engine_generate(engine, prompts, sampling, keep_logits=args.dump_logits is not None,
                             on_token=stream if detokenizer else None, progress=detokenizer is None)
    if sender:
        sender.stop()
    if detokenizer:
        print()
        if detokenizer.unknown:
            print(f"warning: ids {sorted(set(detokenizer.unknown))[:10]} are not in the tokenizer: not shown",
                  file=sys.stderr)
    report(result, tokenizer.decode if tokenizer else None)
    if messages:
        parsed = parse_output(tokenizer.decode(result.generated_ids[0], skip_special_tokens=True))
        print(f"reasoning: {parsed.reasoning!r}\ncontent: {parsed.content!r}")
        for call in parsed.tool_calls:
            print(f"tool call: {call['function']['name']}({call['function']['arguments']})")
    if layout.world > 1:
        report_parallel(model, backend, sender.plans)
    write_outputs(result, args.output_json, args.dump_logits)
    if backend:
        backend.close()
    return 0
