"""Context parallelism: one sequence's KV cache spread over the attention groups (segments of its positions in
turn), every group attending every group's queries against its own blocks, gives the logits of the sequence
held whole by one rank: the prefill (its segments in parallel, one per group) and every decode step, beside
a request that is not spread."""

import numpy as np
import pytest
from hf_reference import relative_error
from thread_ranks import ThreadCollectives, plans_to_every_rank

from kernels import collectives
from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.step import KV_BLOCK, Step, spread_step
from minimax_m2.generation import Sampling
from minimax_m2.parallel import ParallelLayout
from minimax_m2.serving.engine import Engine
from minimax_m2.serving.verify_gate import VerifyGate

RTOL = 1e-5
SEGMENT = 2 * KV_BLOCK  # positions of one segment, held by one group; segment j by group j % dp
LONG, SHORT, NEW = 700, 40, 4
BLOCKS = 8  # per group


def prompt(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.int32)


@pytest.fixture(scope="module")
def reference(float32_checkpoint) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each request run alone on one rank: (its ids, prompt and new; its logits at every fed position)."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024)
    return [tuple(a[0] for a in model.generate(prompt(n, seed)[None], NEW, return_logits=True))
            for n, seed in ((LONG, 1), (SHORT, 2))]


class Layout:
    """Where the long request's blocks are: its segments in turn over the groups, each group's blocks taken in
    order; the short one in the last group's blocks after them."""

    def __init__(self, dp: int, length: int):
        self.dp = dp
        taken = [0] * dp
        self.long: list[tuple[int, int, int]] = []  # (group, block, first position)
        for first in range(0, length, KV_BLOCK):
            g = first // SEGMENT % dp
            self.long.append((g, taken[g], first))
            taken[g] += 1
        self.short = [(dp - 1, taken[dp - 1] + b, b * KV_BLOCK) for b in range(-(-(SHORT + NEW) // KV_BLOCK))]

    @staticmethod
    def held(blocks: list[tuple[int, int, int]], last: int) -> dict[int, list[tuple[int, int]]]:
        """{group: [(block, first position)]} of the blocks up to position `last`."""
        mine: dict[int, list[tuple[int, int]]] = {}
        for g, b, first in blocks:
            if first <= last:
                mine.setdefault(g, []).append((b, first))
        return mine


def prefill_steps(dp: int, long: np.ndarray, short: np.ndarray, layout: Layout) -> list[tuple[Step, list]]:
    """The long prompt's segments, dp at a time (group g the segment of its turn, row 0), the short prompt in
    the first step (the last group's row 1) -> (step, for each row: (request, first position, count) or None)."""
    steps = []
    for turn in range(0, -(-len(long) // SEGMENT), dp):
        rows = 2 * dp
        step = Step(np.zeros((rows, SEGMENT), np.int32), np.zeros((rows, SEGMENT), np.int32), None,
                    np.zeros((rows, SEGMENT), bool), np.tile(np.arange(SEGMENT, dtype=np.int32), (rows, 1)), rows,
                    return_logits=True)
        held, fed = [{} for _ in range(rows)], [None] * rows
        for g in range(dp):
            start = (turn + g) * SEGMENT
            if start < len(long):
                n = min(SEGMENT, len(long) - start)
                fed[2 * g] = (0, start, n)
                held[2 * g] = layout.held(layout.long, start + n - 1)
        if turn == 0:
            fed[2 * dp - 1] = (1, 0, len(short))
            held[2 * dp - 1] = layout.held(layout.short, len(short) - 1)
        for r, what in enumerate(fed):
            if what is not None:
                request, start, n = what
                ids = (long, short)[request]
                step.input_ids[r, :n] = ids[start : start + n]
                step.positions[r, :n] = np.arange(start, start + n)
                step.token_valid[r, :n] = True
        steps.append((spread_step(step, held, dp, BLOCKS), fed))
    return steps


def decode_step(dp: int, tokens: tuple[int, int], positions: tuple[int, int], layout: Layout) -> Step:
    """The long request in group 0's row 0, the short one in the last group's row 1."""
    rows = 2 * dp
    step = Step(np.zeros((rows, 1), np.int32), np.zeros((rows, 1), np.int32), None, np.zeros((rows, 1), bool),
                np.zeros((rows, 1), np.int32), 2, return_logits=True)
    held = [{} for _ in range(rows)]
    for r, blocks, token, position in ((0, layout.long, tokens[0], positions[0]),
                                       (rows - 1, layout.short, tokens[1], positions[1])):
        step.input_ids[r], step.positions[r], step.token_valid[r] = token, position, True
        held[r] = layout.held(blocks, position)
    return spread_step(step, held, dp, BLOCKS)


@pytest.mark.parametrize("world, tp", [(2, 1), (4, 2), (4, 1)])
def test_a_spread_sequence_gives_the_logits_of_one_rank(float32_checkpoint, reference, world, tp) -> None:
    (long_ids, long_logits), (short_ids, short_logits) = reference
    layout_of = ParallelLayout(world, tp)
    dp = layout_of.dp
    blocks = Layout(dp, LONG + NEW)

    def rank(r: int) -> list[tuple[str, float]]:
        model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024,
                                               layout=ParallelLayout(world, tp, r))
        model.allocate(BLOCKS + 2)
        errors = []
        for step, fed in prefill_steps(dp, long_ids[:LONG], short_ids[:SHORT], blocks):
            out = model.run(step)
            for row, what in enumerate(fed):
                if what is not None:
                    request, start, n = what
                    want = (long_logits, short_logits)[request][start : start + n]
                    errors.append((f"prefill {request} at {start}", relative_error(out.logits[row, :n], want)))
        for k in range(NEW - 1):
            at = (LONG + k, SHORT + k)
            out = model.run(decode_step(dp, (long_ids[at[0]], short_ids[at[1]]), at, blocks))
            errors.append((f"decode {k} long", relative_error(out.logits[0, 0], long_logits[at[0]])))
            errors.append((f"decode {k} short", relative_error(out.logits[-1, 0], short_logits[at[1]])))
        return errors

    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(rank)
    finally:
        collectives.set_backend(None)
    for r, errors in enumerate(results):
        assert len(errors) == 2 * (NEW - 1) + len(range(0, LONG, SEGMENT)) + 1
        for what, error in errors:
            assert error < RTOL, f"rank {r}: {what}: {error:.2e}"


def _served(engine: Engine, rounds: list[list[list[int]]]) -> list[list[list[int]]]:
    """Greedy tokens of each round's prompts, the rounds one after another (a later round finds the cache the
    earlier ones left)."""
    return [[r.generated for r in engine.generate(prompts, Sampling(max_new_tokens=NEW + 4))] for prompts in rounds]


@pytest.mark.parametrize("world, tp", [(2, 1), (4, 2), (4, 1)])
def test_the_engine_spreads_a_long_prompt_and_gives_one_ranks_tokens(float32_checkpoint, world, tp) -> None:
    """An engine over `world` ranks (threads) stripes a prompt past `spread_from` over the attention groups
    (its prefill in consecutive chunks a group each, its decode beside unspread requests); a second round
    re-sends it with a new turn, finding its striped prefix cached: every token equals one rank's. The warm-up
    runs every shape of the set first, the spread ones too, on every rank."""
    long = prompt(LONG, 1).tolist()
    rounds = [[long, prompt(SHORT, 2).tolist(), prompt(90, 3).tolist()],
              [long + prompt(150, 4).tolist(), prompt(SHORT, 2).tolist()]]
    one = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024)
    want = _served(Engine(one, max_num_seqs=4, prefill_chunk=128), rounds)
    blocks = 32

    def load(r: int) -> MiniMaxM2Model:
        return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024,
                                              layout=ParallelLayout(world, tp, r))

    def lead(model: MiniMaxM2Model, sender) -> tuple[list, dict, int]:
        engine = Engine(model, max_num_seqs=4, prefill_chunk=128, executor=sender, kv_blocks=blocks,
                        spread_from=500)
        assert engine.warm_up(every_shape=True) > 0  # every shape, the spread ones too, runs on every rank
        got = _served(engine, rounds)
        return got, engine.metrics(), engine.runner.stats["reused_tokens"]

    (got, metrics, reused), _ = plans_to_every_rank(world, load, blocks, lead)
    assert got == want
    assert reused >= LONG // KV_BLOCK * KV_BLOCK  # the second round found the striped prompt's full blocks
    assert metrics["blocks_used"] == 0


def test_spread_and_unspread_requests_in_a_small_pool_preempt_without_changing_a_token(float32_checkpoint) -> None:
    """Two prompts past `spread_from` striped over two groups beside short ones, in a pool so small that a
    decode step must preempt: every request still gives one rank's tokens, and every block comes back."""
    prompts = [prompt(600, 1).tolist(), prompt(40, 2).tolist(), prompt(50, 3).tolist(), prompt(530, 4).tolist(),
               prompt(30, 5).tolist()]
    sampling = Sampling(max_new_tokens=150)
    one = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024)
    want = [r.generated for r in Engine(one, max_num_seqs=4, prefill_chunk=128).generate(prompts, sampling)]
    blocks = 9

    def load(r: int) -> MiniMaxM2Model:
        return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024, layout=ParallelLayout(2, 1, r))

    def lead(model: MiniMaxM2Model, sender) -> tuple[list, int, int]:
        engine = Engine(model, max_num_seqs=4, prefill_chunk=128, executor=sender, kv_blocks=blocks, spread_from=500)
        got = [r.generated for r in engine.generate(prompts, sampling)]
        return got, engine.scheduler.preemptions, engine.metrics()["blocks_used"]

    (got, preemptions, used), _ = plans_to_every_rank(2, load, blocks, lead)
    assert got == want
    assert preemptions > 0 and used == 0


@pytest.mark.parametrize("world, tp", [(2, 1), (4, 2)])
def test_a_striped_request_verifies_its_drafts_and_gives_one_ranks_tokens(float32_checkpoint, world, tp) -> None:
    """Speculation for a striped request: its drafts (and those of a request beside it, not striped) verified in
    spread verify steps, every group attending its part of each row's cache, the steps' plans sent to every
    rank: exactly one rank's plain tokens; the verify steps' shapes are in the set the warm-up runs."""
    long = (prompt(50, 5).tolist() * 14)[:650]  # it repeats itself: its n-grams draft
    prompts = [long, prompt(SHORT, 2).tolist()]
    sampling = Sampling(max_new_tokens=40)
    one = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024)
    want = [r.generated for r in Engine(one, max_num_seqs=4, prefill_chunk=128).generate(prompts, sampling)]
    blocks = 32

    def load(r: int) -> MiniMaxM2Model:
        return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=1024,
                                              layout=ParallelLayout(world, tp, r))

    def lead(model: MiniMaxM2Model, sender) -> tuple[list, dict, list, int]:
        engine = Engine(model, max_num_seqs=4, prefill_chunk=128, executor=sender, kv_blocks=blocks, spread_from=500,
                        speculative=4, verify_gate=VerifyGate(always=True))
        shapes = [s for s in engine.shapes.shapes() if s[0] == "spread_verify"]
        if world == 2:
            assert engine.warm_up(every_shape=True) > 0  # the spread verify steps among them, on every rank
        steps, execute = [], sender.execute
        sender.execute = lambda step: steps.append(step) or execute(step)
        got = [r.generated for r in engine.generate(prompts, sampling)]
        verified = sum(s.spread is not None and s.input_ids.shape[1] == 5 and s.token_valid[:, 1:].any() for s in steps)
        return got, engine.metrics(), shapes, verified

    (got, metrics, shapes, verified), _ = plans_to_every_rank(world, load, blocks, lead)
    assert got == want
    assert verified > 0 and metrics["accepted_tokens"] > 0 and metrics["blocks_used"] == 0
    assert shapes and all(seq == 5 for _, _, _, seq, _ in shapes)
