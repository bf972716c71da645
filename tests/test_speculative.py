"""Speculative decoding with n-gram drafts: exactly the tokens of plain decoding (greedy: identical; sampled:
the same distribution, reproducible under a seed), in ragged batches with prefix reuse and arrivals, over
ranks as threads and under torchrun, with fewer steps where the output repeats its context."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from thread_ranks import plans_to_every_rank

from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.step import StepOutput
from minimax_m2.generation import Sampling
from minimax_m2.parallel import ParallelLayout
from minimax_m2.sampling import sampling_probs
from minimax_m2.serving.drafts import NgramDrafter
from minimax_m2.serving.engine import Engine
from minimax_m2.serving.request import Request
from minimax_m2.serving.row_sampling import verify

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
    drafter = NgramDrafter()
    assert drafter.draft([1, 2, 3, 4, 9, 9, 2, 3], 3) == [4, 9, 9]  # "2 3" was followed by "4 9 9"
    assert drafter.draft([1, 2, 3, 4, 9, 9, 2, 3, 4, 7, 2, 3, 4], 2) == [7, 2], "the latest occurrence, longest n"
    assert NgramDrafter().draft([1, 2, 3, 5], 4) == [] and NgramDrafter().draft([5, 5, 5], 0) == []


def test_greedy_tokens_are_plain_decodings_with_fewer_steps(model) -> None:
    """Ragged prompts arriving while others run, sharing a cached prefix: the same tokens with k = 4 drafts as
    without, in fewer steps (the tiny model repeats itself, which n-gram drafts catch)."""
    sampling = Sampling(max_new_tokens=48)
    plain = Engine(model, max_num_seqs=4, prefill_chunk=16)
    want = _arriving(plain, _prompts(), sampling)
    fast = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=4)
    got = _arriving(fast, _prompts(), sampling)
    assert got == want
    assert fast.stats["reused_tokens"] > 0 and fast.stats["accepted_tokens"] > 0
    assert fast.stats["decode_steps"] < plain.stats["decode_steps"]
    assert fast.load()["mean_accepted_length"] > 1


def test_on_this_cpu_a_verify_steps_experts_see_only_its_real_tokens(model) -> None:
    """Where no shape is compiled, a verify step bounds its experts' rows by the tokens it really holds (its
    padding row left out), so that the CPU's schedule is chosen for those."""
    engine = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=4)
    seen = []
    run = engine.executor.execute

    def record(step):
        if step.input_ids.shape[1] == 5:  # 1 + 4 tokens a row: a verify step (prefill buckets are 16 here)
            seen.append((step.max_tokens, int(step.token_valid.sum())))
        return run(step)

    engine.executor.execute = record
    engine.generate([[9, 8, 7, 6] * 6], Sampling(max_new_tokens=24))
    assert seen and all(bound == real for bound, real in seen)


def test_seeded_sampling_with_drafts_is_reproducible(model) -> None:
    sampling = Sampling(max_new_tokens=40, temperature=0.7, top_k=8, seed=11)
    runs = [Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=3).generate(_prompts(), sampling)
            for _ in range(2)]
    assert [r.generated for r in runs[0]] == [r.generated for r in runs[1]]


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
        taken = verify(request, out, 0, draft, None)
        first[taken[0][0]] += 1
        accepted += taken[0][0] == draft[0]
    bound = 4.5 * np.sqrt(p * (1 - p) / trials)  # 4.5 standard errors each
    assert np.all(np.abs(first / trials - p) < bound), (first / trials, p)
    assert abs(accepted / trials - p[draft[0]]) < bound[draft[0]]


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 1, 2), (2, 2, 1)])
def test_ranks_verify_as_one_process(float32_checkpoint, model, world, tp, moe_tp) -> None:
    """Rank 0's engine sends every verify step's plan to the other rank (ranks as threads): greedy tokens
    equal plain decoding's in one process."""
    sampling = Sampling(max_new_tokens=32)
    want = _arriving(Engine(model, max_num_seqs=4, prefill_chunk=16), _prompts(), sampling)
    def load(r: int) -> MiniMaxM2Model:
        return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=160,
                                              layout=ParallelLayout(world, tp, r, moe_tp=moe_tp))

    def lead(ranked: MiniMaxM2Model, sender) -> tuple[list[list[int]], int]:
        engine = Engine(ranked, max_num_seqs=4, prefill_chunk=16, executor=sender, speculative=4)
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
    generated = json.loads(out.read_text())["generated_ids"]
    for prompt, tokens in zip(prompts, generated):
        ids = model.generate(np.array([prompt]), max_new_tokens=24)
        assert tokens == ids[0, len(prompt):].tolist()
