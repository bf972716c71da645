"""Speculative decoding with n-gram drafts on an edit workload, on CPU: accepted length, the cost of a verify
step against a decode step, and TPOT with and without it, at batch 1, 8 and 16.

The workload: the prompt holds a Python source file of this environment (--file, default json/encoder.py,
about 3,000 tokens of the byte-level BPE of 32,000 tokens `bench_structured.py` trains); the reference
answer is that file with small edits (an identifier renamed, a line added every 40). A random-weight model
does not write that answer, so the two halves are measured apart and combined:
- acceptance: the reference answer replayed through the engine's drafter (`NgramDrafter`, the engine's
  adaptive draft count): the tokens each verify step would gain if the model wrote the reference;
- step costs: the medium random config (hidden 1024, 8 layers, 64 experts top-8) decoding B requests of
  --context tokens of the prompt together, side by side in one run: plain decode steps, and verify steps
  of 1 + k tokens a row (every row drafting k consecutive tokens of its prompt, distinct tokens as a copied
  span's are: the experts they hit, not whether they are accepted, set the step's cost), and the least
  useful verify step (one row drafting one token, the others none): what a step of poor drafts costs;
  beside the verify/decode ratio, its floor here: the decode step plus the distinct experts the drafted
  tokens add, each at this machine's best time for reading an expert (`benchmarks.expert_floor`; random
  weights route each drafted token on its own, as a real model's copied span need not);
- poor drafts served: every row drafting tokens of its prompt that the model rejects, the engine's drafter
  adapting, TPOT (decode seconds per new token) verifying every step, with the engine's measured gate
  (`minimax_m2.serving.verify_gate`), and without speculation: what the gate saves where drafts fail.
TPOT with speculation = verify step / tokens gained a step; without = decode step.
- a repeated turn (an agent's request sent again: a retry, or parallel workers given the same files): B
  requests of --context prompt tokens answered with --answer tokens by the random model itself (sampled at
  temperature 1, top_k 40, with a seed each, which gives the same answer again as greedy decoding would on
  a real model; the random model's greedy answer repeats one token, which a request's own drafts catch), then the
  same B requests again, served by the engine with its measured gate: the second round drafts the first
  round's answers (`SharedAnswers`); TPOT (decode seconds per token after the first) of each round beside
  plain decoding's, the tokens checked identical; and the same B requests sent again while the first tries
  still run (each half answered: a client's retry after a timeout), drafting the answers being given, the
  retries' TPOT with and without speculation.

  python benchmarks/bench_speculative.py [--k 4] [--batches 1 8 16] [--steps 12] [--context 1024] [--answer 64]
                                        [--json F]
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import table  # noqa: E402
from benchmarks.bench_structured import bpe_tokenizer  # noqa: E402
from benchmarks.expert_floor import expert_read_ms, step_floor  # noqa: E402
from benchmarks.medium_config import MEDIUM  # noqa: E402
from minimax_m2 import MiniMaxM2Model  # noqa: E402
from minimax_m2.config import MiniMaxM2Config  # noqa: E402
from minimax_m2.generation import Sampling  # noqa: E402
from minimax_m2.serving.drafts import NgramDrafter  # noqa: E402
from minimax_m2.serving.engine import Engine  # noqa: E402
from minimax_m2.serving.verify_gate import VerifyGate  # noqa: E402

HEADROOM = 1024  # positions past the prompt: the first rows decode while the last are prefilled


def edit_workload(tokenizer, source: Path) -> tuple[list[int], list[int]]:
    """(prompt, reference answer) token ids: the file, and the file with small edits."""
    text = source.read_text()
    lines = text.replace("self", "this").splitlines()
    edited = "\n".join(line + ("  # reviewed" if i % 40 == 39 else "") for i, line in enumerate(lines))
    prompt = f"Rename self to this and mark every 40th line as reviewed:\n\n{text}\n\nThe edited file:\n\n"
    return tokenizer.encode(prompt).ids, tokenizer.encode(edited).ids


def replay(prompt: list[int], answer: list[int], k: int) -> tuple[int, int]:
    """(verify steps, tokens) of decoding `answer` with drafts checked against it, k adapting as the engine's."""
    drafter, done, steps = NgramDrafter(k), 0, 0
    while done < len(answer):
        draft = drafter.draft(prompt + answer[:done], min(drafter.k, len(answer) - done - 1))
        accepted = 0
        while accepted < len(draft) and draft[accepted] == answer[done + accepted]:
            accepted += 1
        if draft:
            drafter.scored(accepted)
        done += accepted + 1
        steps += 1
    return steps, len(answer)


class AlwaysDrafts(NgramDrafter):
    """Drafts every step, for measuring a verify step's cost: consecutive tokens of `source` (a span of the
    prompt, moving on each step), so that they are routed to the experts as a copied span's distinct tokens
    are (a random model's own output repeats one token, whose drafts would all hit its experts)."""

    def __init__(self, source: list[int], k: int):
        super().__init__(k)
        self.source = source

    def draft(self, tokens: list[int], k: int) -> list[int]:
        start = len(tokens) % (len(self.source) - k) if k > 0 else 0
        return self.source[start : start + k]


def step_seconds(model: MiniMaxM2Model, prompts: list[list[int]], steps: int, k: int, drafting: int | None = None,
                 drafted: int | None = None) -> float:
    """Median seconds of a decode step (k = 0) or of a verify step of 1 + k tokens a row, all rows decoding:
    the first `drafting` rows (default all) drafting `drafted` tokens each step (default k; the engine's own
    count would fall to one, the random model rejecting them)."""
    drafters = range(len(prompts) if drafting is None else drafting) if k else range(0)

    def reset(requests: list) -> None:
        for i in drafters:
            requests[i].drafter.k = k if drafted is None else drafted

    timed = decode_steps(model, prompts, steps, k, VerifyGate(always=True), drafters, reset)
    return statistics.median(seconds for seconds, _ in timed)


def served_tpot(model: MiniMaxM2Model, prompts: list[list[int]], steps: int, k: int, gate: VerifyGate) -> float:
    """Decode seconds per new token over `steps` steps, every row drafting (tokens of its prompt, which the
    model rejects) with the engine's adaptive count, verified as `gate` decides."""
    timed = decode_steps(model, prompts, steps, k, gate, range(len(prompts)) if k else range(0), lambda _: None)
    return sum(seconds for seconds, _ in timed) / sum(tokens for _, tokens in timed)


def decode_steps(model: MiniMaxM2Model, prompts: list[list[int]], steps: int, k: int, gate: VerifyGate,
                 drafting: range, before_step: Callable[[list], None]) -> list[tuple[float, int]]:
    """(seconds, new tokens) of `steps` engine steps that only decode, every request decoding, the requests
    `drafting` drafting tokens of their prompts (`AlwaysDrafts`); before_step(requests) runs before each."""
    engine = Engine(model, max_num_seqs=len(prompts), prefill_chunk=512, speculative=k, keep_logits=False,
                    verify_gate=gate)
    requests = [engine.submit(p, Sampling(max_new_tokens=HEADROOM - 24)) for p in prompts]  # none ends first
    for i, r in enumerate(requests):
        r.drafter = AlwaysDrafts(r.prompt, k) if i in drafting else None
    timed = []
    while not engine.idle() and len(timed) < steps:
        before_step(requests)
        before = engine.stats["decode_seconds"], engine.stats["prefill_steps"], engine.stats["generated_tokens"]
        decoding = all(r.decoding for r in requests)
        engine.step()
        if decoding and engine.stats["prefill_steps"] == before[1]:
            timed.append((engine.stats["decode_seconds"] - before[0], engine.stats["generated_tokens"] - before[2]))
    for r in requests:
        engine.cancel(r)
    engine.step()
    return timed


def repeated_turn(model: MiniMaxM2Model, prompts: list[list[int]], answer: int, k: int) -> dict[str, float]:
    """TPOT in ms of plain decoding, and with speculation of a first round and of the same requests again."""
    sampling = [Sampling(max_new_tokens=answer, temperature=1.0, top_k=40, seed=i) for i in range(len(prompts))]

    def served(engine: Engine) -> tuple[list[list[int]], float]:
        seconds, tokens = engine.stats["decode_seconds"], engine.stats["generated_tokens"]
        generated = [r.generated for r in engine.generate(prompts, sampling)]
        return generated, 1e3 * (engine.stats["decode_seconds"] - seconds) / (
            engine.stats["generated_tokens"] - tokens - len(prompts))

    want, plain = served(Engine(model, max_num_seqs=len(prompts), prefill_chunk=512, keep_logits=False))
    engine = Engine(model, max_num_seqs=len(prompts), prefill_chunk=512, keep_logits=False, speculative=k)
    first, first_ms = served(engine)
    accepted, rows = engine.stats["accepted_tokens"], engine.stats["verified_rows"]
    second, second_ms = served(engine)
    assert first == second == want, "speculation changed a token"
    verified = engine.stats["verified_rows"] - rows
    retry_plain = retried(Engine(model, max_num_seqs=2 * len(prompts), prefill_chunk=512, keep_logits=False),
                          prompts, sampling, want)
    retry = retried(Engine(model, max_num_seqs=2 * len(prompts), prefill_chunk=512, keep_logits=False, speculative=k),
                    prompts, sampling, want)
    return {"plain_ms": plain, "first_ms": first_ms, "again_ms": second_ms,
            "again_accepted_length": (engine.stats["accepted_tokens"] - accepted) / verified + 1 if verified else 0.0,
            "retry_plain_ms": retry_plain, "retry_ms": retry}


def retried(engine: Engine, prompts: list[list[int]], sampling: list[Sampling], want: list[list[int]]) -> float:
    """The requests sent again once every first try has half its answer (a client's retry after a timeout, the
    first tries still running): the retries' mean TPOT in ms (wall time between their first and last tokens),
    their tokens checked against `want`."""
    firsts = [engine.submit(p, s) for p, s in zip(prompts, sampling)]
    while min(len(r.generated) for r in firsts) < len(want[0]) // 2:
        engine.step()
    times: list[list[float]] = [[] for _ in prompts]
    retries = [engine.submit(p, s, lambda kind, _, t=t: kind == "token" and t.append(time.perf_counter()))
               for p, s, t in zip(prompts, sampling, times)]
    while not engine.idle():
        engine.step()
    assert [r.generated for r in firsts] == [r.generated for r in retries] == want, "speculation changed a token"
    return 1e3 * statistics.mean((t[-1] - t[0]) / (len(t) - 1) for t in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--steps", type=int, default=12, help="steps timed per case")
    parser.add_argument("--file", type=Path, default=Path(json.__file__).parent / "encoder.py")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens of the step-cost runs")
    parser.add_argument("--answer", type=int, default=64, help="new tokens a request of the repeated turn")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    config = MiniMaxM2Config.from_dict(MEDIUM)
    tokenizer = bpe_tokenizer(config.vocab_size)
    prompt, answer = edit_workload(tokenizer, args.file)
    steps, tokens = replay(prompt, answer, args.k)
    gained = tokens / steps
    print(f"edit workload: {args.file.name}, prompt {len(prompt)} tokens, reference answer {tokens} tokens")
    print(f"  n-gram drafts (k = {args.k}, adaptive): {steps} steps, {gained:.2f} tokens per step")
    context = min(args.context, len(prompt))
    model = MiniMaxM2Model.random(config, seed=0, max_seq_len=context + HEADROOM)
    rows, read_ms = [], expert_read_ms()
    for batch in args.batches:
        prompts = [prompt[: context - i] for i in range(batch)]
        plain = step_seconds(model, prompts, args.steps, 0)
        verify = step_seconds(model, prompts, args.steps, args.k)
        least = step_seconds(model, prompts, args.steps, args.k, drafting=1, drafted=1)
        poor = {name: 1e3 * served_tpot(model, prompts, 3 * args.steps, k, gate) for name, k, gate in
                (("always", args.k, VerifyGate(always=True)), ("gated", args.k, VerifyGate()),
                 ("plain", 0, VerifyGate()))}
        again = repeated_turn(model, prompts, args.answer, args.k)
        floor = step_floor(1e3 * plain, batch, batch * (1 + args.k), read_ms)
        rows.append({"batch": batch, "decode_ms": 1e3 * plain, "verify_ms": 1e3 * verify, "ratio": verify / plain,
                     "ratio_floor": floor["ratio"], "verify_distinct_experts": floor["distinct_experts"],
                     "one_draft_ms": 1e3 * least, "tpot_plain_ms": 1e3 * plain, "tpot_spec_ms": 1e3 * verify / gained,
                     "poor_drafts_tpot_ms": poor, "repeated_turn": again})
        print(f"  batch {batch}: decode step {1e3 * plain:.1f} ms, verify step {1e3 * verify:.1f} ms, with one draft "
              f"{1e3 * least:.1f} ms; poor drafts TPOT verifying every step {poor['always']:.1f} ms, gated "
              f"{poor['gated']:.1f} ms, plain {poor['plain']:.1f} ms", flush=True)
    print(f"medium config, context {context} tokens, median of {args.steps} steps each (this machine, shared):")
    print(f"(reading one expert takes at best {read_ms:.3f} ms here; the floor counts each distinct expert once)")
    table.header("batch", "decode step", "verify step (1 + k a row)", "ratio", "ratio's floor (distinct experts)",
                 "verify step, one row drafting one token", "TPOT plain", "TPOT with drafts", "speedup")
    for r in rows:
        table.row(r["batch"], f"{r['decode_ms']:.1f} ms", f"{r['verify_ms']:.1f} ms", f"{r['ratio']:.2f}x",
                  f"{r['ratio_floor']:.2f}x ({r['verify_distinct_experts']:.1f} a layer)",
                  f"{r['one_draft_ms']:.1f} ms ({r['one_draft_ms'] / r['decode_ms']:.2f}x)",
                  f"{r['tpot_plain_ms']:.1f} ms", f"{r['tpot_spec_ms']:.1f} ms",
                  f"{r['tpot_plain_ms'] / r['tpot_spec_ms']:.2f}x")
    print(f"poor drafts served ({3 * args.steps} steps): TPOT")
    table.header("batch", "verifying every step", "gated (measured costs)", "plain decoding", "gated / plain")
    for r in rows:
        poor = r["poor_drafts_tpot_ms"]
        table.row(r["batch"], f"{poor['always']:.1f} ms", f"{poor['gated']:.1f} ms", f"{poor['plain']:.1f} ms",
                  f"{poor['gated'] / poor['plain']:.2f}x")
    print(f"a repeated turn ({args.answer} sampled tokens a request, seeded; the engine's gate): TPOT")
    table.header("batch", "plain decoding", "first round", "the same requests again", "again / plain",
                 "accepted length again")
    for r in rows:
        again = r["repeated_turn"]
        table.row(r["batch"], f"{again['plain_ms']:.1f} ms", f"{again['first_ms']:.1f} ms",
                  f"{again['again_ms']:.1f} ms", f"{again['again_ms'] / again['plain_ms']:.2f}x",
                  f"{again['again_accepted_length']:.2f}")
    print("the same requests sent again while the first tries run (each first try half answered): TPOT of the "
          "retries")
    table.header("batch", "plain decoding", "with drafts", "with drafts / plain")
    for r in rows:
        again = r["repeated_turn"]
        table.row(r["batch"], f"{again['retry_plain_ms']:.1f} ms", f"{again['retry_ms']:.1f} ms",
                  f"{again['retry_ms'] / again['retry_plain_ms']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"k": args.k, "tokens_per_step": gained, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
