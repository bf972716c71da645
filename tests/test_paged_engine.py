"""The engine over the paged KV cache: requests sharing a prefix reference its blocks (and copy the partial last
one) and still give the logits of a cold prefill; a pool too small for every running request preempts
and resumes requests without changing a token; a 12,000-token prompt gives transformers' logits."""

import numpy as np
import pytest
from hf_reference import greedy_logits, relative_error

from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.step import KV_BLOCK
from minimax_m2.generation import Sampling
from minimax_m2.serving.engine import Engine

RTOL = 1e-5


@pytest.fixture(scope="module")
def model(float32_checkpoint) -> MiniMaxM2Model:
    return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024)


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def alone(model: MiniMaxM2Model, prompt: list[int], new: int) -> tuple[list[int], np.ndarray]:
    result = Engine(model, max_num_seqs=1, prefill_chunk=256).generate([prompt], Sampling(max_new_tokens=new),
                                                                       keep_logits=True)[0]
    return result.generated, result.logits


def test_concurrent_requests_share_a_system_prompts_blocks(model) -> None:
    system = tokens(2 * KV_BLOCK + 44, seed=1)
    prompts = [system + tokens(20, seed=10 + i) for i in range(4)]
    want = [alone(model, p, 6) for p in prompts]
    engine = Engine(model, max_num_seqs=4, prefill_chunk=128)
    first = engine.submit(prompts[0], Sampling(max_new_tokens=30), keep_logits=True)
    while first.prefilled < len(first.prompt):
        engine.step()
    others = [engine.submit(p, Sampling(max_new_tokens=6), keep_logits=True) for p in prompts[1:]]
    engine.step()
    pool = engine.cache.pools[0]
    assert all(r.blocks[:2] == first.blocks[:2] for r in others), "the full blocks were not shared"
    assert [pool.blocks[b].refs for b in first.blocks[:2]] == [4, 4]
    assert engine.load()["blocks_used"] == 3 + 3 * 1, "each request should add only its own last block"
    assert all(r.reused == len(system) for r in others), "the partial block was not copied"
    while not engine.idle():
        engine.step()
    for request, (generated, logits) in zip([first] + others, want):
        assert request.generated[:6] == generated
        kept = np.concatenate(request.logits)  # from the first position it computed
        assert relative_error(kept[: len(logits) - request.reused], logits[request.reused:]) < RTOL


def test_a_pool_too_small_preempts_and_resumes_without_changing_a_token(model) -> None:
    """Four blocks for requests that each grow to three: the most recently admitted gives its blocks back
    and runs its context again later; every request's tokens and logits are what it gives alone."""
    prompts = [tokens(10, seed=20 + i) for i in range(3)]
    new = 2 * KV_BLOCK + 40
    want = [alone(model, p, new) for p in prompts]
    engine = Engine(model, max_num_seqs=3, prefill_chunk=64, kv_blocks=4)
    sampled = Sampling(max_new_tokens=new)
    results = engine.generate(prompts, [sampled] * 3, keep_logits=True)
    assert engine.counters()["preemptions"] > 0, "the pool was never short: the test proves nothing"
    for result, (generated, logits) in zip(results, want):
        assert result.generated == generated
        assert result.logits.shape == logits.shape and relative_error(result.logits, logits) < RTOL
    assert engine.load()["blocks_used"] == 0


def test_seeded_sampling_survives_preemption(model) -> None:
    prompts = [tokens(10, seed=30 + i) for i in range(3)]
    settings = [Sampling(max_new_tokens=2 * KV_BLOCK + 20, temperature=0.8, top_k=20, seed=i) for i in range(3)]
    want = [Engine(model, max_num_seqs=1).generate([p], s)[0].generated for p, s in zip(prompts, settings)]
    engine = Engine(model, max_num_seqs=3, prefill_chunk=64, kv_blocks=4)
    assert [r.generated for r in engine.generate(prompts, settings)] == want
    assert engine.counters()["preemptions"] > 0


def test_a_request_larger_than_the_pool_is_refused_before_it_is_queued(model) -> None:
    engine = Engine(model, max_num_seqs=2, kv_blocks=2)
    with pytest.raises(ValueError, match="need 3 KV blocks of 128 positions, but the pool has 2"):
        engine.submit(tokens(200, seed=1), Sampling(max_new_tokens=100))
    assert engine.idle()


def test_twelve_thousand_tokens_against_transformers(hf_model, tmp_path) -> None:
    """A 12,100-token prompt prefilled in chunks of 2048 through the paged cache, then decoded."""
    from hf_reference import save

    path = save(hf_model, tmp_path / "long")
    prompt = np.random.default_rng(7).integers(0, 256, (1, 12_100))
    want_tokens, want = greedy_logits(hf_model, prompt, 3)
    engine = Engine(MiniMaxM2Model.from_pretrained(path, max_seq_len=12_160), max_num_seqs=1, prefill_chunk=2048)
    result = engine.generate([prompt[0].tolist()], Sampling(max_new_tokens=3), keep_logits=True)[0]
    assert result.generated == want_tokens[0, 12_100:].tolist()
    assert relative_error(result.logits[-3:], want[0, -3:]) < RTOL
    assert relative_error(result.logits, want[0]) < RTOL


def test_many_requests_sharing_prefixes_in_a_small_pool(model) -> None:
    """Twenty requests drawn from three conversations (random shared prefixes, lengths crossing blocks, some
    growing by two or three blocks), some cancelled midway, arriving while others run over a pool of 6
    blocks (preempting): every request that finishes gives its tokens alone, no block stays held, and what
    is cached is consistent with what was written."""
    rng = np.random.default_rng(3)
    stems = [tokens(300, seed=40 + i) for i in range(3)]
    prompts = [stems[rng.integers(3)][: rng.integers(100, 300)] + tokens(int(rng.integers(1, 60)), seed=50 + i)
               for i in range(20)]
    new = [260 if i % 3 == 0 else 12 for i in range(20)]  # some grow by two or three blocks while others arrive
    want = {i: alone(model, p, new[i])[0] for i, p in enumerate(prompts)}
    engine = Engine(model, max_num_seqs=4, prefill_chunk=64, kv_blocks=6)
    submitted, cancelled = {}, set()
    for step in range(5000):
        if len(submitted) < len(prompts) and step % 3 == 0:
            i = len(submitted)
            submitted[i] = engine.submit(prompts[i], Sampling(max_new_tokens=new[i]))
        if step % 17 == 5 and submitted:
            victim = max(submitted)
            if submitted[victim].finish_reason is None and victim % 4 == 1:
                engine.cancel(submitted[victim])
                cancelled.add(victim)
        if len(submitted) == len(prompts) and engine.idle():
            break
        engine.step()
    assert engine.idle() and len(submitted) == len(prompts)
    counters = engine.counters()
    assert counters["preemptions"] > 0 and counters["reused_tokens"] > 0 and cancelled, counters
    for i, request in submitted.items():
        if i not in cancelled:
            assert request.finish_reason == "length" and request.generated == want[i], f"request {i}"
    assert engine.load()["blocks_used"] == 0
    for pool in engine.cache.pools:
        for block in pool.blocks:
            assert block.refs == 0 and len(block.tokens) <= 128
            if block.chain is not None and pool.full.get(block.chain) == block.id:
                assert len(block.tokens) == 128
