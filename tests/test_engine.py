"""The serving engine: every request gives the logits and tokens it gives alone, whatever it is batched with and
whenever it arrives; prefix reuse gives a cold prefill's logits; slots are freed as requests end; seeded
sampling does not depend on the batch; requests that cannot fit are refused before they are queued."""

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import greedy_logits, relative_error

from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.step import KV_BLOCK, kv_len_for, min_rows
from minimax_m2.generation import Sampling
from minimax_m2.serving.engine import Engine
from minimax_m2.serving.request import Request
from minimax_m2.serving.shapes import DECODE_TILE_FLOOR, PREFILL_KV_FLOOR, ShapeSet

RTOL = 1e-5


@pytest.fixture(scope="module")
def model(float32_checkpoint) -> MiniMaxM2Model:
    return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=96)


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]


def alone(model: MiniMaxM2Model, prompt: list[int], new: int) -> tuple[list[int], np.ndarray]:
    ids, logits = model.generate(np.array([prompt]), new, return_logits=True)
    return ids[0, len(prompt):].tolist(), logits[0]


@pytest.mark.parametrize("slots, chunk", [(2, 8), (4, 64), (1, 5)],
                         ids=["2-slots-chunk-8", "4-slots", "1-slot-chunk-5"])
def test_ragged_prompts_batched_give_what_each_gives_alone(model, slots, chunk) -> None:
    prompts = prompts_of([7, 3, 20, 12, 1, 33])
    engine = Engine(model, max_num_seqs=slots, prefill_chunk=chunk)
    results = engine.generate(prompts, Sampling(max_new_tokens=6), keep_logits=True)
    for prompt, result in zip(prompts, results):
        tokens, logits = alone(model, prompt, 6)
        assert result.generated == tokens and result.finish_reason == "length"
        assert relative_error(result.logits, logits) < RTOL
    m = engine.metrics()
    assert m["slots_busy"] == 0
    # 7 + 3 + 20 + 12 + 1 + 33 = 76 prompt tokens in chunks; each request's 5 tokens after its first in decode steps
    assert m["prefill_steps"] >= -(-76 // chunk) and m["decode_steps"] >= 5
    assert m["prefill_seconds"] > 0 and m["decode_seconds"] > 0
    assert m["prefill_seconds"] + m["decode_seconds"] <= m["step_seconds"]


def test_the_engine_matches_transformers(float32_checkpoint, hf_model) -> None:
    """Both rows of the shared prompt through the engine, against transformers' own greedy decoding."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    want_tokens, want_logits = greedy_logits(hf_model, PROMPT, 9)
    engine = Engine(model, max_num_seqs=2, prefill_chunk=4)
    results = engine.generate(PROMPT.tolist(), Sampling(max_new_tokens=9), keep_logits=True)
    for row, result in enumerate(results):
        assert result.generated == want_tokens[row, PROMPT.shape[1]:].tolist()
        assert relative_error(result.logits, want_logits[row]) < RTOL


def test_requests_arriving_while_others_run(model) -> None:
    """New requests join running ones step by step (continuous batching): each still gives its own answer."""
    prompts = prompts_of([9, 25, 4, 14], seed=1)
    engine = Engine(model, max_num_seqs=3, prefill_chunk=8)
    requests = []
    for prompt in prompts:
        requests.append(engine.submit(prompt, Sampling(max_new_tokens=7), keep_logits=True))
        engine.step()
        engine.step()
    while not engine.idle():
        engine.step()
    for prompt, request in zip(prompts, requests):
        tokens, logits = alone(model, prompt, 7)
        assert request.generated == tokens
        assert relative_error(np.concatenate(request.logits), logits) < RTOL


def test_a_long_prompt_delays_decodes_by_at_most_one_chunk(model) -> None:
    engine = Engine(model, max_num_seqs=2, prefill_chunk=8)
    short = engine.submit(prompts_of([3])[0], Sampling(max_new_tokens=20))
    engine.step()
    long = engine.submit(prompts_of([60], seed=2)[0], Sampling(max_new_tokens=2))
    before = len(short.generated)
    for _ in range(4):
        engine.step()
        assert len(short.generated) == before + 1, "a decode waited for the long prompt"
        before += 1
    assert 0 < long.prefilled < 60
    while not engine.idle():
        engine.step()


def test_prefix_reuse_gives_the_cold_logits(model) -> None:
    """The next turn of a conversation reuses the cached turn (its slot was freed, not cleared); a request
    sharing a long prefix with a running one copies that row. Both equal a cold prefill."""
    engine = Engine(model, max_num_seqs=2, prefill_chunk=16)
    first = prompts_of([30], seed=3)[0]
    turn = engine.generate([first], Sampling(max_new_tokens=5))[0]
    second = first + turn.generated + prompts_of([6], seed=4)[0]
    result = engine.generate([second], Sampling(max_new_tokens=5), keep_logits=True)[0]
    assert result.reused == len(first) + 4, "the previous turn's cache was not reused"
    tokens, logits = alone(model, second, 5)
    assert result.generated == tokens and relative_error(result.logits, logits[result.reused:]) < RTOL

    system = prompts_of([40], seed=5)[0]
    running = engine.submit(system + [1, 2], Sampling(max_new_tokens=30))
    while running.prefilled < len(running.prompt):
        engine.step()
    sharing = engine.submit(system + [3], Sampling(max_new_tokens=4), keep_logits=True)
    while not engine.idle():
        engine.step()
    assert sharing.reused == 40, "the busy slot's prefix was not copied"
    tokens, logits = alone(model, system + [3], 4)
    assert sharing.generated == tokens and relative_error(np.concatenate(sharing.logits), logits[40:]) < RTOL


def test_eviction_reuses_only_what_the_slot_still_holds(model) -> None:
    """With one slot, a request in between overwrites the cached conversation: the next turn must not
    reuse it (and still gives the cold logits)."""
    engine = Engine(model, max_num_seqs=1, prefill_chunk=16)
    first = prompts_of([20], seed=6)[0]
    turn = engine.generate([first], Sampling(max_new_tokens=3))[0]
    engine.generate([prompts_of([25], seed=7)[0]], Sampling(max_new_tokens=3))
    second = first + turn.generated + [5]
    result = engine.generate([second], Sampling(max_new_tokens=3), keep_logits=True)[0]
    assert result.reused == 0
    tokens, logits = alone(model, second, 3)
    assert result.generated == tokens and relative_error(result.logits, logits) < RTOL


def test_seeded_sampling_does_not_depend_on_the_batch(model) -> None:
    sampled = Sampling(max_new_tokens=8, temperature=0.9, top_k=50, top_p=0.9, seed=11)
    prompt = prompts_of([10], seed=8)[0]
    alone_tokens = Engine(model, max_num_seqs=1).generate([prompt], sampled)[0].generated
    others = prompts_of([4, 17, 9], seed=9)
    batched = Engine(model, max_num_seqs=4, prefill_chunk=8).generate(
        others[:1] + [prompt] + others[1:], [Sampling(max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 2, 3)][:1]
        + [sampled] + [Sampling(max_new_tokens=8, temperature=0.5, seed=s) for s in (4, 5)])
    assert batched[1].generated == alone_tokens


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (0.8, 5), (0.8, None)],
                         ids=["greedy", "sampled-on-device", "sampled-on-host"])
def test_logprobs_are_the_log_softmax_of_each_new_tokens_logits(model, temperature, top_k) -> None:
    """Each new token's log-probability and the 3 most likely tokens', from the model's own distribution,
    whoever samples it; the logits they come from are the ones the tests above compare with transformers."""
    prompts = prompts_of([5, 11], seed=4)
    sampling = Sampling(max_new_tokens=4, temperature=temperature, top_k=top_k, seed=1, logprobs=3)
    results = Engine(model, max_num_seqs=2).generate(prompts, sampling, keep_logits=True)
    plain = Engine(model, max_num_seqs=2).generate(prompts, sampling)  # the engine asks for the logits itself
    for prompt, result, alike in zip(prompts, results, plain):
        assert len(result.logprobs) == len(result.generated) == 4 and alike.generated == result.generated
        assert np.allclose([lp for lp, _ in alike.logprobs], [lp for lp, _ in result.logprobs], rtol=0, atol=1e-5)
        rows = result.logits[len(prompt) - 1:].astype(np.float64)  # the logits each new token was chosen from
        shifted = rows - rows.max(-1, keepdims=True)
        reference = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
        for token, (logprob, top), expected in zip(result.generated, result.logprobs, reference):
            assert abs(logprob - expected[token]) < 1e-9
            assert [i for i, _ in top] == np.argsort(-expected, kind="stable")[:3].tolist()
            assert np.allclose([v for _, v in top], np.sort(expected)[::-1][:3], rtol=0, atol=1e-9)
            if temperature == 0:
                assert top[0][0] == token


def test_eos_and_cancel_free_the_slot_at_once(model) -> None:
    engine = Engine(model, max_num_seqs=2)
    prompt = prompts_of([6], seed=10)[0]
    greedy, _ = alone(model, prompt, 5)
    stopped = engine.generate([prompt], Sampling(max_new_tokens=5, eos_token_ids=(greedy[1],)))[0]
    assert stopped.generated == greedy[:2] and stopped.finish_reason == "stop"
    request = engine.submit(prompt, Sampling(max_new_tokens=50))
    engine.step()
    engine.cancel(request)
    engine.step()
    assert request.finish_reason == "cancelled" and engine.metrics()["slots_busy"] == 0


def test_fifo_admission_when_slots_are_full(model) -> None:
    engine = Engine(model, max_num_seqs=1)
    first = engine.submit(prompts_of([5])[0], Sampling(max_new_tokens=3))
    second = engine.submit(prompts_of([5], seed=1)[0], Sampling(max_new_tokens=3))
    engine.step()
    assert first.blocks and not second.blocks and engine.metrics()["queue_depth"] == 1
    while not engine.idle():
        engine.step()
    assert first.finish_reason == second.finish_reason == "length"


def test_what_cannot_fit_is_refused_before_it_is_queued(model) -> None:
    engine = Engine(model, max_num_seqs=1)
    with pytest.raises(ValueError, match="exceed the context of 96 tokens"):
        engine.submit(prompts_of([90])[0], Sampling(max_new_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([1, 999], Sampling())
    with pytest.raises(ValueError, match=r"Sampling logprobs must be None or an integer in \[0, 20\]"):
        engine.submit([1, 2], Sampling(logprobs=21))
    assert engine.metrics()["queue_depth"] == 0


def test_every_step_has_a_shape_of_the_set(model) -> None:
    engine = Engine(model, max_num_seqs=3, prefill_chunk=16)
    seen = set()
    run = engine.executor.execute

    def record(step):
        rows, seq = step.input_ids.shape
        seen.add(("decode" if seq == 1 else "prefill", rows, step.bucket, seq, step.kv_len or kv_len_for(
            step.kv_length, model.max_seq_len)))
        return run(step)

    engine.executor.execute = record
    engine.generate(prompts_of([3, 40, 17, 9]), Sampling(max_new_tokens=4))
    allowed = {(phase, max(min_rows(seq), rows), bucket, seq, kv)
               for phase, rows, bucket, seq, kv in engine.shapes.shapes()}
    assert seen and seen <= allowed, seen - allowed
    assert min(rows * seq for _, rows, _, seq, _ in seen) >= 2, "no compiled shape has a token axis of 1"


def test_the_shape_set_at_the_longest_context_stays_small() -> None:
    """The README's serving flags (8 attention groups, 32 requests each, chunks of 2048) at 196,608 positions:
    decode steps of 2 or 32 rows per group, each bucket one its rows can hold and no smaller fewer rows could,
    DECODE_TILE_FLOOR tiles a group at least; a prefill attends at least its floor, several rows only at it."""
    shapes = ShapeSet.build(8, 32, 2048, 196_608)
    assert shapes.decode_rows == (2, 32)
    for phase, rows, bucket, seq, kv in shapes.shapes():
        if phase == "decode":
            assert bucket <= rows * 8 and (rows == 2 or bucket > 2)
            assert kv >= DECODE_TILE_FLOOR * KV_BLOCK
        else:
            assert kv >= max(seq, PREFILL_KV_FLOOR) and (rows == 1 or kv == PREFILL_KV_FLOOR)
            assert bucket == rows * 8
    assert len(shapes.shapes()) <= 200
    # where a slice group spans fewer than all attention groups, rows per group size the experts' buffers
    assert ShapeSet.build(8, 32, 2048, 196_608, rows_size_experts=True).decode_rows == (2, 4, 8, 16, 32)


def test_decode_tiles_start_at_the_floor_where_shapes_are_compiled() -> None:
    """A NeuronCore's decode steps attend DECODE_TILE_FLOOR tiles a group at least (fewer when no row can
    hold that many); this CPU's attend their own tiles' bucket."""
    device, cpu = ShapeSet.build(2, 4, 256, 8192), ShapeSet.build(2, 4, 256, 8192, compiled=False)
    assert device.tile_counts(4, 8)[0] == DECODE_TILE_FLOOR and cpu.tile_counts(4, 8)[0] == 4
    assert ShapeSet.build(2, 4, 256, 64).tile_counts(2, 1) == [2], "a 64-position context holds 2 tiles a row"


def test_on_this_cpu_a_prefill_attends_its_own_length(float32_checkpoint) -> None:
    """Where NumPy runs the steps no shape is compiled: a prefill attends the bucket of its own rows' end from
    KV_BLOCK up (not the NeuronCore's floor of PREFILL_KV_FLOOR), still sharing steps up to that floor; a
    NeuronCore's shape set is unchanged."""
    cpu = ShapeSet.build(1, 4, 256, 2 * PREFILL_KV_FLOOR, compiled=False)
    device = ShapeSet.build(1, 4, 256, 2 * PREFILL_KV_FLOOR)
    assert cpu.kv_lengths[0] == KV_BLOCK and device.kv_lengths[0] == PREFILL_KV_FLOOR
    assert cpu.holds(4, 32, PREFILL_KV_FLOOR) and not cpu.holds(4, 32, 2 * PREFILL_KV_FLOOR)
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=2 * PREFILL_KV_FLOOR)
    engine = Engine(model, max_num_seqs=4, prefill_chunk=256)
    seen = []
    run = engine.executor.execute

    def record(step):
        seen.append(step.kv_len)
        return run(step)

    engine.executor.execute = record
    engine.generate(prompts_of([200, 30], seed=4), Sampling(max_new_tokens=2))
    assert seen[0] == 2 * KV_BLOCK, "a 200-token prefill attends 256 positions"


@pytest.mark.parametrize("sampling", [Sampling(max_new_tokens=4, logprobs=2),
                                      Sampling(max_new_tokens=4, temperature=0.9, top_k=20, seed=5)],
                         ids=["greedy-logprobs", "sampled"])
def test_on_this_cpu_the_lm_head_leaves_padding_rows_out(model, sampling) -> None:
    """One request decoding runs steps of 2 rows (no compiled input has a dimension of 1), and three of 4;
    on this CPU the lm_head takes only the rows up to the last real one, unpadded, and every request gives
    the tokens and log-probabilities (to float32 rounding) it gives in a batch holding no padding."""
    prompts = prompts_of([9, 5, 14], seed=6)
    full = Engine(model, max_num_seqs=4, prefill_chunk=16).generate(prompts + prompts_of([11], seed=7), sampling)
    for batch in ([prompts[0]], prompts):
        engine = Engine(model, max_num_seqs=4, prefill_chunk=16)
        heads = []
        run = model.runner
        model.runner = lambda unit: (heads.append(unit.inputs["selected"].size) if unit.name == "lm_head" else None,
                                     run(unit))[1]
        try:
            results = engine.generate(batch, sampling)
        finally:
            model.runner = run
        assert heads and max(heads[1:]) == len(batch), "a decode step's lm_head took its padding rows"
        for got, want in zip(results, full):
            assert got.generated == want.generated
            if sampling.logprobs:
                chosen = [[p for p, _ in r.logprobs] for r in (got, want)]
                assert np.allclose(*chosen, rtol=RTOL, atol=0)


def test_past_the_floor_a_prefill_row_runs_alone_in_its_group(float32_checkpoint) -> None:
    """Short prompts share prefill steps while every row attends at most PREFILL_KV_FLOOR positions; a long
    prompt's chunks past it run one row per group, the others waiting; every step has a shape of the set,
    and every request gives what it gives alone."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=2 * PREFILL_KV_FLOOR)
    engine = Engine(model, max_num_seqs=4, prefill_chunk=1024)
    seen = []
    run = engine.executor.execute

    def record(step):
        seen.append((step.input_ids.shape, step.bucket, step.kv_len, int(step.token_valid.any(axis=1).sum())))
        return run(step)

    engine.executor.execute = record
    prompts = prompts_of([PREFILL_KV_FLOOR + 900, 30, 40, 25], seed=3)
    results = engine.generate(prompts, Sampling(max_new_tokens=3))
    allowed = {(max(min_rows(seq), rows), bucket, seq, kv) for _, rows, bucket, seq, kv in engine.shapes.shapes()}
    assert {(shape[0], bucket, shape[1], kv) for shape, bucket, kv, _ in seen} <= allowed
    long_steps = [(shape, busy) for shape, _, kv, busy in seen if shape[1] > 1 and kv > PREFILL_KV_FLOOR]
    assert long_steps and all(shape[0] == 1 and busy == 1 for shape, busy in long_steps)
    assert any(shape[1] > 1 and busy > 1 for shape, _, _, busy in seen), "short prompts shared a step"
    for prompt, result in zip(prompts, results):
        assert result.generated == alone(model, prompt, 3)[0]


def test_an_engine_keeping_no_logits_compiles_no_all_position_logits(model) -> None:
    serving, generating = (Engine(model, max_num_seqs=2, prefill_chunk=16, keep_logits=keep) for keep in (False, True))

    def heads_returning_every_position(engine: Engine) -> int:
        return sum(1 for unit in engine.programs().values() if unit.name == "lm_head"
                   and unit.constants.get("return_logits") and unit.inputs["selected"].shape[0] > 2 * 2)

    assert heads_returning_every_position(serving) == 0
    assert heads_returning_every_position(generating) > 0
    assert len(serving.programs()) < len(generating.programs())
    with pytest.raises(ValueError, match="keep_logits=False"):
        serving.submit([1, 2, 3], Sampling(), keep_logits=True)


def test_a_requests_context_is_counted_and_sliced_without_copying_it() -> None:
    """context_length and context_tokens agree with the context list (the prompt and every new token but the
    last) before and after tokens come."""
    request = Request(list(range(10)), Sampling(max_new_tokens=8))
    for generated in ([], [50], [50, 51, 52]):
        request.generated = generated
        context = request.context
        assert request.context_length == len(context)
        assert all(request.context_tokens(a, b) == context[a:b] for a in range(14) for b in range(a, 14))
