"""Speculative decoding with n-gram drafts: exactly the tokens of plain decoding (greedy, and sampled under a
seed: each position takes plain decoding's draw), in ragged batches with prefix reuse and arrivals, over ranks
as threads and under torchrun, with fewer steps where the output repeats its context; verified only where the
measured costs say it pays (`VerifyGate`), drafts scored while they are not verified."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from thread_ranks import plans_to_every_rank

from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.step import Step, StepOutput
from minimax_m2.generation import Sampling
from minimax_m2.parallel import ParallelLayout
from minimax_m2.sampling import sampling_probs
from minimax_m2.serving.drafts import NgramDrafter, SharedAnswers
from minimax_m2.serving.engine import Engine
from minimax_m2.serving.request import Joined, Request
from minimax_m2.serving.row_sampling import verify
from minimax_m2.serving.verify_gate import VerifyGate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(float32_checkpoint) -> MiniMaxM2Model:
    return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=160)


def _prompts() -> list[list[int]]:
    """Ragged prompts sharing a 40-token prefix (reused from the cache), one repeating itself."""
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 256, 40).tolist()
    return [shared + rng.integers(0, 256, n).tolist() for n in (3, 11, 26)] + [[9, 8, 7, 6] * 6, [5]]


def _arriving(engine: Engine, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """The prompts submitted a few steps apart (each arrives while others decode)."""
    requests = []
    for prompt in prompts:
        requests.append(engine.submit(prompt, sampling))
        for _ in range(2):
            engine.step()
    while not engine.idle():
        engine.step()
    return [r.generated for r in requests]


def test_drafts_follow_the_latest_earlier_occurrence() -> None:
    drafter = NgramDrafter(4)
    assert drafter.draft([1, 2, 3, 4, 9, 9, 2, 3], 3) == [4, 9, 9]  # "2 3" was followed by "4 9 9"
    assert drafter.draft([1, 2, 3, 4, 9, 9, 2, 3, 4, 7, 2, 3, 4], 2) == [7, 2], "the latest occurrence, longest n"
    assert NgramDrafter(4).draft([1, 2, 3, 5], 4) == [] and NgramDrafter(4).draft([5, 5, 5], 0) == []
    assert NgramDrafter(4).draft([7, 5, 5, 5, 5], 3) == [5, 5, 5], "a repeated token goes on repeating"
    assert NgramDrafter(4).draft([3, 1, 2, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1], "and a repeated span"


def test_greedy_tokens_are_plain_decodings_with_fewer_steps(model) -> None:
    """Ragged prompts arriving while others run, sharing a cached prefix: the same tokens with k = 4 drafts as
    without, in fewer steps (the tiny model repeats itself, which n-gram drafts catch)."""
    sampling = Sampling(max_new_tokens=48)
    plain = Engine(model, max_num_seqs=4, prefill_chunk=16)
    want = _arriving(plain, _prompts(), sampling)
    fast = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=4, verify_gate=VerifyGate(always=True))
    got = _arriving(fast, _prompts(), sampling)
    assert got == want
    assert fast.stats["reused_tokens"] > 0 and fast.stats["accepted_tokens"] > 0
    assert fast.stats["decode_steps"] < plain.stats["decode_steps"]
    assert fast.load()["mean_accepted_length"] > 1


def test_on_this_cpu_a_verify_steps_experts_see_only_its_real_tokens(model) -> None:
    """Where no shape is compiled, a verify step bounds its experts' rows by the tokens it really holds (its
    padding row left out), so that the CPU's schedule is chosen for those."""
    engine = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=4, verify_gate=VerifyGate(always=True))
    seen = []
    run = engine.executor.execute

    def record(step):
        if step.input_ids.shape[1] == 5:  # 1 + 4 tokens a row: a verify step (prefill buckets are 16 here)
            seen.append((step.max_tokens, int(step.token_valid.sum())))
        return run(step)

    engine.executor.execute = record
    engine.generate([[9, 8, 7, 6] * 6], Sampling(max_new_tokens=24))
    assert seen and all(bound == real for bound, real in seen)


def test_on_this_cpu_a_verify_steps_lm_head_takes_only_its_real_positions(model) -> None:
    """Where no shape is compiled, the lm_head of a verify step takes each row's last token and drafts,
    not the positions a row drafting fewer than k tokens pads, nor a padding row; the tokens are plain
    decoding's."""
    sampling = Sampling(max_new_tokens=24)
    prompts = [[9, 8, 7, 6] * 6, [3, 1, 4, 1, 5, 9, 2, 6]]
    want = Engine(model, max_num_seqs=4, prefill_chunk=16).generate(prompts, sampling)
    engine = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=4, verify_gate=VerifyGate(always=True))
    seen = []
    run, execute = model.runner, engine.executor.execute

    def record(step):
        if step.input_ids.shape[1] == 5:  # a verify step
            seen.append([int(step.token_valid.sum())])
        return execute(step)

    def head(unit):
        if unit.name == "lm_head" and seen and len(seen[-1]) == 1:
            seen[-1].append(unit.inputs["selected"].size)
        return run(unit)

    engine.executor.execute, model.runner = record, head
    try:
        got = engine.generate(prompts, sampling)
    finally:
        model.runner = run
    assert [r.generated for r in got] == [r.generated for r in want]
    assert seen and all(real == taken for real, taken in seen)
    assert any(real < 10 for real, _ in seen), "no verify step held a short draft or a padding row"


@pytest.mark.parametrize("top_k", [8, None], ids=["drawn-on-the-device", "drawn-on-the-host"])
def test_seeded_sampling_with_drafts_takes_plain_decodings_tokens(model, top_k) -> None:
    """Sampled rows, seeded: the same tokens verifying drafts every step as decoding plainly (each position
    drawn with the draw plain decoding uses there). The drafts are plain decoding's own next tokens, every
    other one with its last token wrong, so that drafts are both accepted whole and rejected part way."""
    sampling = Sampling(max_new_tokens=40, temperature=0.7, top_k=top_k, seed=11)
    want = [r.generated for r in Engine(model, max_num_seqs=4, prefill_chunk=16).generate(_prompts(), sampling)]
    fast = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=3, verify_gate=VerifyGate(always=True))
    requests = [fast.submit(p, sampling) for p in _prompts()]
    for request, tokens in zip(requests, want):
        def draft(context: list[int], k: int, request=request, tokens=tokens) -> list[int]:
            ahead = tokens[len(request.generated):][:k]
            return ahead[:-1] + [(ahead[-1] + 1) % 256] if ahead and len(request.generated) % 2 else ahead
        request.drafter.draft = draft
    while not fast.idle():
        fast.step()
    assert [r.generated for r in requests] == want
    assert 0 < fast.stats["accepted_tokens"] < fast.stats["drafted_tokens"]


def test_sampled_verification_keeps_plain_decodings_distribution() -> None:
    """The rule for a deterministic draft over a tiny vocabulary, 20,000 verifications: the first new token's
    frequencies are p's (the draft's or not), and a row accepts its draft with probability p(draft)."""
    vocab, draft, trials = 6, [2, 4], 20000
    logits = np.array([[1.0, 0.2, 1.5, -1.0, 0.7, 0.0], [0.1, 0.3, 0.2, 0.9, 2.0, -0.5],
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)[None]
    out = StepOutput(np.zeros((1, 3), np.int32), logits)
    sampling = Sampling(max_new_tokens=8, temperature=0.9, seed=0)
    p = sampling_probs(logits[0, 0], 0.9, None, None)
    request = Request([1], sampling)
    first, accepted = np.zeros(vocab), 0
    for _ in range(trials):
        taken = verify(request, out, 0, draft, request.rng.random(len(draft) + 1).tolist())
        first[taken[0][0]] += 1
        accepted += taken[0][0] == draft[0]
    bound = 4.5 * np.sqrt(p * (1 - p) / trials)  # 4.5 standard errors each
    assert np.all(np.abs(first / trials - p) < bound), (first / trials, p)
    assert abs(accepted / trials - p[draft[0]]) < bound[draft[0]]


@pytest.mark.parametrize("world, tp, moe_tp, temperature", [(2, 1, 2, 0.0), (2, 2, 1, 0.0), (2, 1, 2, 0.5)])
def test_ranks_verify_as_one_process(float32_checkpoint, model, world, tp, moe_tp, temperature) -> None:
    """Rank 0's engine sends every verify step's plan to the other rank (ranks as threads; a sampled step
    with a draw for each position): the tokens equal plain decoding's in one process, greedy or seeded."""
    sampling = Sampling(max_new_tokens=32, temperature=temperature, top_k=2, seed=5)
    want = _arriving(Engine(model, max_num_seqs=4, prefill_chunk=16), _prompts(), sampling)
    def load(r: int) -> MiniMaxM2Model:
        return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=160,
                                              layout=ParallelLayout(world, tp, r, moe_tp=moe_tp))

    def lead(ranked: MiniMaxM2Model, sender) -> tuple[list[list[int]], int]:
        engine = Engine(ranked, max_num_seqs=4, prefill_chunk=16, executor=sender, speculative=4,
                        verify_gate=VerifyGate(always=True))
        return _arriving(engine, _prompts(), sampling), engine.stats["accepted_tokens"]

    (got, accepted), _ = plans_to_every_rank(world, load, 4 * 2, lead)
    assert got == want and accepted > 0


def test_torchrun_generate_with_drafts_gives_plain_tokens(float32_checkpoint, model, tmp_path) -> None:
    """`--mode generate --speculative ngram` over W = 2 processes: the tokens one process gives greedily."""
    out = tmp_path / "ids.json"
    prompts = [[9, 8, 7, 6] * 5, [3, 1, 4, 1, 5, 9, 2, 6]]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "run_example.py"), "--mode", "generate", "--checkpoint", str(float32_checkpoint),
               *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))], "--ep", "2",
               "--max-new-tokens", "24", "--max-seq-len", "64", "--speculative", "ngram",
               "--num-speculative-tokens", "4", "--collective-timeout", "60", "--output-json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speculative:" in done.stdout
    assert "rank 0 scheduled every step" in done.stdout  # one scheduler: timed verify choices never differ
    generated = json.loads(out.read_text())["generated_ids"]
    for prompt, tokens in zip(prompts, generated):
        ids = model.generate(np.array([prompt]), max_new_tokens=24)
        assert tokens == ids[0, len(prompt):].tolist()


def test_a_watched_draft_is_scored_by_the_tokens_that_follow() -> None:
    """A draft not verified is matched against the tokens that follow it: its accepted count sets the next
    draft count and moves the expected acceptance, as a verification would."""
    drafter = NgramDrafter(4)
    drafter.watch([5, 6, 7])
    drafter.watch([1, 1])  # one at a time: ignored
    for token in (5, 6, 9):
        drafter.followed(token)
    assert drafter.k == 3 and drafter.expected == pytest.approx(4 + 0.3 * (2 - 4))
    for _ in range(20):
        drafter.watch([8])
        drafter.followed(2)
    assert drafter.k == 1 and drafter.expected < 0.01


def _step(rows: int, tokens_per_row: int) -> Step:
    return Step(np.zeros((rows, tokens_per_row), np.int32), np.zeros((rows, tokens_per_row), np.int32), None,
                np.ones((rows, tokens_per_row), bool), np.zeros((rows, 1), np.int32), rows)


def test_the_gate_verifies_where_the_expected_tokens_pay_for_the_measured_step() -> None:
    """Plain until a decode step of that many rows is timed; then a verify step of an untimed size is tried
    when drafts are expected to gain anything; once both are timed, a verify step runs when its expected
    tokens per second beat a decode step's."""
    gate = VerifyGate()
    assert not gate.opens(2, 10, 2, 9.0), "no decode step of 2 rows timed yet"
    gate.measured(_step(2, 1), 0.010)
    assert gate.opens(2, 10, 2, 2.5) and not gate.opens(2, 10, 2, 2.0)
    gate.measured(_step(2, 5), 0.020)  # verify steps of 10 tokens cost 2x a decode step
    assert gate.opens(2, 10, 2, 4.5) and not gate.opens(2, 10, 2, 3.5)
    assert gate.opens(2, 3, 2, 2.5), "a verify step of 3 tokens is not timed yet"
    gate.measured(_step(2, 5), 0.040)  # running means: 0.025 s
    assert gate.verify[(2, 16)] == pytest.approx(0.025) and not gate.opens(2, 10, 2, 4.5)
    assert VerifyGate(always=True).opens(2, 10, 2, 0.0)


def test_poor_drafts_turn_verification_off(model) -> None:
    """Drafts the model rejects, with verify steps timed at 3x decode steps: after the first few steps the
    engine decodes plainly (its drafts still watched), and the tokens are plain decoding's."""
    sampling = Sampling(max_new_tokens=40)
    prompts = [[9, 8, 7, 6] * 6, [3, 1, 4, 1, 5, 9, 2, 6]]
    want = [r.generated for r in Engine(model, max_num_seqs=4, prefill_chunk=16).generate(prompts, sampling)]
    gate = VerifyGate()
    engine = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=4, verify_gate=gate)
    measured = gate.measured
    gate.measured = lambda step, seconds: measured(step, 0.003 if step.input_ids.shape[1] > 1 else 0.001)
    never = next(t for t in range(256) if all(t not in w for w in want))
    requests = [engine.submit(p, sampling) for p in prompts]
    for r in requests:
        r.drafter.draft = lambda tokens, k: [never] * k  # never the model's next token
    while not engine.idle():
        engine.step()
    assert [r.generated for r in requests] == want
    assert 0 < engine.stats["verify_steps"] <= 3 and engine.stats["accepted_tokens"] == 0


def test_drafts_read_the_prompt_and_output_as_one_sequence_uncopied() -> None:
    """A request's sequence (prompt + generated, neither copied) reads as the joined list: items, slices,
    length; a drafter fed it step by step drafts what it drafts from the list."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        head, tail = rng.integers(0, 4, rng.integers(0, 8)).tolist(), rng.integers(0, 4, rng.integers(0, 8)).tolist()
        joined, full = Joined(head, tail), head + tail
        a, b = (int(v) for v in rng.integers(-10, 12, 2))
        assert joined[a:b] == full[a:b] and joined[a:] == full[a:] and len(joined) == len(full)
        assert [joined[i] for i in range(-len(full), len(full))] == full[-len(full):] + full
    sequence = rng.integers(0, 4, 80).tolist()
    split, listed = NgramDrafter(4), NgramDrafter(4)
    for cut in range(6, 80, 3):
        assert split.draft(Joined(sequence[:5], sequence[5:cut]), 4) == listed.draft(sequence[:cut], 4)


def test_drafts_are_the_latest_earlier_occurrences_of_the_longest_suffix() -> None:
    """Fed a sequence in pieces of every size, a drafter drafts what a search of the whole sequence finds."""
    def searched(tokens: list[int], k: int) -> list[int]:
        for n in (4, 3, 2):
            follower = max((p for p in range(n, len(tokens)) if tokens[p - n:p] == tokens[-n:]), default=None)
            if len(tokens) > n and follower is not None:
                span = tokens[follower:follower + k]
                return (span * k)[:k]
        return []

    rng = np.random.default_rng(5)
    for trial in range(60):  # pieces of 8 tokens or more indexed as sorted blocks in a third of the trials
        sequence, drafter, end = rng.integers(0, 5, 120).tolist(), NgramDrafter(4, bulk=(8, 1 << 30, 1)[trial % 3]), 0
        while end < len(sequence):
            end += int(rng.integers(1, 30))
            k = int(rng.integers(1, 7))
            assert drafter.draft(sequence[:end], k) == searched(sequence[:end], k)


def test_shared_answers_draft_what_an_earlier_answer_followed_with() -> None:
    answers = SharedAnswers(capacity=12)
    answers.add([1, 2, 3, 4, 5], [6, 7, 8, 9])  # kept as [3, 4, 5, 6, 7, 8, 9]: the prompt's last 3, the answer
    assert answers.draft([0, 3, 4, 5, 6], 2) == [7, 8], "a 4-gram across the prompt's end and the answer's start"
    assert answers.draft([4, 5, 6], 2) == [] and answers.draft([9, 4, 5, 6], 2) == [], "only the last 4 tokens"
    answers.add([0], [9, 9, 6, 7, 8, 1])  # 7 tokens: the first answer is dropped to stay within 12
    assert answers.tokens == 7 and answers.draft([3, 4, 5, 6], 2) == []
    assert answers.draft([9, 6, 7, 8], 3) == [1] and answers.hits == 2
    assert NgramDrafter(4, shared=answers).draft([1, 2, 1, 2], 2) == [1, 2], "the request's own tokens first"
    assert NgramDrafter(4, shared=answers).draft([5, 9, 6, 7, 8], 2) == [1], "then the shared answers"
    assert NgramDrafter(4, shared=answers).draft([2, 6, 7, 8, 0, 9, 6, 7, 8], 2) == [1], \
        "the shared answers' 4-gram before the request's own 3-gram"


def test_a_running_answer_is_shared_token_by_token() -> None:
    answers = SharedAnswers()
    running = NgramDrafter(4, shared=answers, prompt=[1, 2, 3, 4, 5])
    for token in (6, 7):
        running.followed(token)
    assert answers.draft([3, 4, 5, 6], 2) == [7], "an n-gram is kept once the token after it is"
    assert answers.draft([4, 5, 6, 7], 2) == [], "the running answer's last n-gram has no next token yet"
    running.followed(8)
    assert NgramDrafter(4, shared=answers, prompt=[0, 3, 4, 5]).draft([0, 3, 4, 5, 6], 3) == [7, 8]
    assert answers.tokens == 3 + 3 + 3, "each request's prompt's last 3 tokens, and the 3 answered"
    small = SharedAnswers(capacity=8)
    first = small.open([1, 2, 3])
    small.add([9], [4, 4, 4, 4, 4, 4])  # over the capacity: the oldest answer, still running, is dropped
    small.extend(first, [7, 7, 7, 7])
    assert small.tokens == 7 and small.draft([1, 2, 3, 7], 1) == []


def test_a_retry_drafts_the_answer_still_being_given_and_gives_its_tokens(model) -> None:
    """A request sent again while the first is still answering (a client's retry after a timeout): the second
    drafts from the first's tokens so far, before it ends, with exactly plain decoding's tokens."""
    prompt = np.random.default_rng(4).integers(0, 256, 30).tolist()
    sampling = Sampling(max_new_tokens=40)
    want = Engine(model, max_num_seqs=2, prefill_chunk=16).generate([prompt], sampling)[0].generated
    assert len(want) == 40, "no end of sequence before the retry is sent (the loop below ends)"
    engine = Engine(model, max_num_seqs=2, prefill_chunk=16, speculative=4, verify_gate=VerifyGate(always=True))
    first = engine.submit(prompt, sampling)
    while len(first.generated) < 24 and first.finish_reason is None:
        engine.step()
    second = engine.submit(prompt, sampling)
    while first.finish_reason is None:
        engine.step()
    assert engine.counters()["shared_drafts"] > 0, "the retry drafted from the running answer"
    while not engine.idle():
        engine.step()
    assert first.generated == second.generated == want


def test_a_repeated_request_drafts_the_earlier_answer_and_gives_its_tokens(model) -> None:
    """An agent's turn sent again (a retry, or a parallel worker on the same files): the second request drafts
    the first one's answer, in fewer steps, with exactly plain decoding's tokens."""
    prompt = np.random.default_rng(3).integers(0, 256, 30).tolist()
    sampling = Sampling(max_new_tokens=40)
    want = Engine(model, max_num_seqs=2, prefill_chunk=16).generate([prompt], sampling)[0].generated
    engine = Engine(model, max_num_seqs=2, prefill_chunk=16, speculative=4, verify_gate=VerifyGate(always=True))
    first = engine.generate([prompt], sampling)[0].generated
    steps, shared = engine.stats["decode_steps"], engine.counters()["shared_drafts"]
    second = engine.generate([prompt], sampling)[0].generated
    assert first == second == want
    assert engine.counters()["shared_drafts"] > shared
    assert engine.stats["decode_steps"] - steps < steps / 2, "the second answer came in fewer than half the steps"
