"""What run_example.py runs: kernel self-checks, a random-weight model, a real checkpoint; how the scripts exit."""

import inspect
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from minimax_m2 import distributed
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.distributed import CollectiveError
from minimax_m2.generation import Sampling
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.serving.engine import Engine


def run_kernel_checks(checks: dict[str, Callable[[], None]]) -> bool:
    """Run each check, print one PASS/FAIL line per check; True when all pass."""
    ok = True
    for name, check in checks.items():
        try:
            check()
            print(f"PASS  {name}")
        except Exception:  # noqa: BLE001 - every failure is reported, then the next check runs
            ok = False
            print(f"FAIL  {name}\n{traceback.format_exc()}")
    print(f"{sum(1 for _ in checks)} kernel checks, {'all passed' if ok else 'some FAILED'}")
    return ok


def kernel_checks(module) -> dict[str, Callable[[], None]]:
    """The test_* functions of a module, by name without the prefix, in source order."""
    functions = inspect.getmembers(module, inspect.isfunction)
    tests = [(f.__code__.co_firstlineno, name, f) for name, f in functions if name.startswith("test_")]
    return {name.removeprefix("test_"): f for _, name, f in sorted(tests)}


def random_config(hidden_size: int, num_layers: int, num_experts: int, top_k: int, vocab_size: int) -> MiniMaxM2Config:
    """A scaled-down MiniMax-M2: head_dim 32, heads = hidden / 32, 4 query heads per KV head, half-rotary."""
    if hidden_size < 128 or hidden_size % 128:
        raise ValueError(f"--hidden-size must be a positive multiple of 128, got {hidden_size}")
    for flag, value in (("--num-layers", num_layers), ("--num-experts", num_experts), ("--experts-per-token", top_k),
                        ("--vocab-size", vocab_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if top_k > num_experts:
        raise ValueError(f"--experts-per-token {top_k} exceeds --num-experts {num_experts}")
    heads = hidden_size // 32
    return MiniMaxM2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size // 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4,
        head_dim=32,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        rotary_dim=16,
    )


@dataclass
class GenerationResult:
    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    logits: list[np.ndarray] | None  # per row [prompt + new - 1, vocab]
    first_token_seconds: float  # until every row had its first new token
    decode_seconds: float  # the rest
    decode_steps: int
    drafted: int = 0  # speculative draft tokens verified
    accepted: int = 0  # of them, accepted
    verified_rows: int = 0  # rows whose drafts a step verified


def engine_generate(engine: Engine, prompts: list[list[int]], sampling: Sampling, keep_logits: bool,
                    on_token: Callable[[int, int], None] | None = None, progress: bool = False) -> GenerationResult:
    """Generate for every prompt through the engine (rows of any lengths, batched), timing the first
    tokens and the rest; on_token(row, id) as they come; progress: a bar over the new tokens."""
    bar = tqdm(total=sampling.max_new_tokens * len(prompts), desc="generating", unit="token", disable=not progress,
               leave=False, delay=2)
    started, first = [False] * len(prompts), [0.0]
    begin = time.perf_counter()

    def token(row: int, value: int) -> None:
        if not started[row]:
            started[row] = True
            if all(started):
                first[0] = time.perf_counter()
        bar.update()
        if on_token:
            on_token(row, value)

    names = ("decode_steps", "drafted_tokens", "accepted_tokens", "verified_rows")
    before = {name: engine.stats[name] for name in names}
    results = engine.generate(prompts, sampling, token, keep_logits)
    end = time.perf_counter()
    bar.close()
    first[0] = first[0] or end
    return GenerationResult(
        prompt_ids=[r.prompt for r in results],
        generated_ids=[r.generated for r in results],
        logits=[r.logits for r in results] if keep_logits else None,
        first_token_seconds=first[0] - begin,
        decode_seconds=end - first[0],
        decode_steps=engine.stats["decode_steps"] - before["decode_steps"],
        drafted=engine.stats["drafted_tokens"] - before["drafted_tokens"],
        accepted=engine.stats["accepted_tokens"] - before["accepted_tokens"],
        verified_rows=engine.stats["verified_rows"] - before["verified_rows"],
    )


def report(result: GenerationResult, decode_text: Callable[[list[int]], str] | None = None) -> None:
    """Print tokens (and text when a tokenizer is known) and timings."""
    for row, (prompt, generated) in enumerate(zip(result.prompt_ids, result.generated_ids)):
        print(f"[{row}] prompt ids:    {prompt}")
        print(f"[{row}] generated ids: {generated}")
        if decode_text:
            print(f"[{row}] text: {decode_text(generated)!r}")
    tokens = sum(map(len, result.prompt_ids))
    print(f"prefill: {tokens} tokens in {result.first_token_seconds * 1e3:.1f} ms "
          f"({tokens / result.first_token_seconds:.1f} tokens/s, until every row's first new token)")
    if result.decode_steps:
        new = sum(map(len, result.generated_ids)) - len(result.generated_ids)
        print(f"decode: {result.decode_steps} steps, {result.decode_seconds / result.decode_steps * 1e3:.2f} ms/step "
              f"({new / max(result.decode_seconds, 1e-9):.1f} tokens/s, {len(result.prompt_ids)} rows)")
    if result.verified_rows:
        print(f"speculative: {result.drafted} draft tokens verified, {result.accepted} accepted "
              f"({result.accepted / result.verified_rows + 1:.2f} tokens per verified row and step)")


def report_parallel(model: MiniMaxM2Model, backend, plans: int) -> None:
    """Layout, this rank's resident weight bytes, the plans rank 0 sent the others, all_to_all traffic and
    dropped pairs (rank 0 prints)."""
    layout, layers = model.layout, model.config.num_hidden_layers
    print(f"ranks {layout.world} (tp {layout.tp}, moe_tp {layout.moe_tp} x moe_ep {layout.moe_ep}, "
          f"{layout.dp} attention groups): {model.weights.layers[0].w13.shape[0]} experts and "
          f"{model.weights.nbytes() / 2**20:.1f} MiB of weights on rank 0")
    print(f"rank 0 scheduled every step and sent the other ranks {plans} plans")
    print(f"all_to_all sent by rank 0: {backend.all_to_all_bytes / 2**20:.2f} MiB over {layers} layers")
    if layout.capacity_factor is not None:
        print(f"capacity factor {layout.capacity_factor:g}: {model.dropped_pairs} (token, expert) pairs dropped")


def write_output(flag: str, path: Path, write: Callable) -> None:
    """write(file) into `path`, every error (a full disk included, which np.save alone can miss) one
    ValueError naming the flag."""
    try:
        with open(path, "wb") as file:
            write(file)
            file.flush()
    except OSError as err:
        raise ValueError(f"{flag} {path}: {err.strerror or err}") from None


def stacked_logits(rows: list[np.ndarray]) -> np.ndarray:
    """Per-row logits [positions, vocab] -> [rows, longest, vocab] float32, shorter rows padded with NaN."""
    longest = max(len(r) for r in rows)
    out = np.full((len(rows), longest, rows[0].shape[-1]), np.nan, np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def write_outputs(result: GenerationResult, output_json: Path | None, dump_logits: Path | None) -> None:
    if output_json:
        record = {"prompt_ids": result.prompt_ids, "generated_ids": result.generated_ids}
        write_output("--output-json", output_json, lambda f: f.write(json.dumps(record).encode()))
        print(f"wrote {output_json}")
    if dump_logits:
        logits = stacked_logits(result.logits)
        write_output("--dump-logits", dump_logits, lambda f: np.save(f, logits))
        print(f"wrote {dump_logits} {list(logits.shape)}")


def load_tokenizer(checkpoint: Path, flag: str = "--prompt"):
    """The checkpoint's tokenizer.json through the `tokenizers` package; a clear error when either is absent."""
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{flag} needs {path}; pass --prompt-ids instead")
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ImportError(f"{flag} needs the `tokenizers` package: pip install tokenizers") from err
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for any malformed file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a tokenizer file the `tokenizers` package can read ({first})") from None


def parse_ids(rows: list[str]) -> list[list[int]]:
    """['1,2,3', '4,5'] -> [[1, 2, 3], [4, 5]]: non-empty rows of non-negative ids below 2**31."""
    ids = []
    for row in rows:
        try:
            values = [int(t) for t in row.split(",") if t.strip()]
        except ValueError as err:
            raise ValueError(f"--prompt-ids takes comma-separated integers: {err}") from None
        if not values:
            raise ValueError("--prompt-ids rows must not be empty")
        outside = [v for v in values if not 0 <= v < 2**31]
        if outside:
            raise ValueError(f"--prompt-ids {outside[0]} is not a token id (ids are 0 .. vocabulary size - 1)")
        ids.append(values)
    return ids


BAD_INPUT = (ValueError, FileNotFoundError, ImportError, OSError)


QUIET_SECONDS = 10.0  # how long a rank stopping quietly waits for torchrun to end it after the reporting rank


def exit_with(main: Callable[[], int]) -> None:
    """sys.exit(main()), where bad input is one `error:` line and exit 2 and a rank lost in a collective is
    one `error:` line and exit 1: never a traceback (MINIMAX_M2_TRACEBACK=1 adds one for anything unexpected).

    Under torchrun bad input ends every rank with status 2 and one `error:` line in all, first on stderr:
    from rank 0 when every rank sees the problem (before the ranks connect), else from the rank that saw
    it, which tells the others through the rendezvous store so that they stop at once and quietly.
    torchrun's own summary of the failed workers follows it. A lost or stalled rank ends the others with
    status 1, so that torchrun stops the stalled one and names it."""
    quiet, message = False, None
    try:
        code = main()
    except CollectiveError as err:
        code = 1
        quiet = distributed.active is not None and distributed.active.aborted() is not None
        message = str(err)
    except BAD_INPUT as err:
        code, message = 2, str(err)
        if distributed.active is not None:
            message = f"rank {distributed.rank()}: {message}"
            print(f"error: {message}", file=sys.stderr, flush=True)  # before the others hear of it and stop
            distributed.active.abort(message)
            sys.exit(code)
        quiet = distributed.rank() != 0
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except MemoryError:
        code, message = 1, "out of memory (the run's memory plan underestimated what this step needed)"
    except Exception as err:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if os.environ.get("MINIMAX_M2_TRACEBACK"):
            raise
        code, message = 1, (f"internal error: {type(err).__name__}: {err} "
                            "(rerun with MINIMAX_M2_TRACEBACK=1 for the traceback)")
    if quiet:  # bad input another rank reports: leave that rank the time to say it before torchrun ends us all
        time.sleep(QUIET_SECONDS)
        sys.exit(2)
    if message is not None:  # else main returned its status, having said what it had to
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
