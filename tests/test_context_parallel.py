"""Context parallelism: one sequence's KV cache spread over the attention groups (segments of its positions in
turn), every group attending every group's queries against its own blocks, gives the logits of the sequence
held whole by one rank: the prefill (its segments in parallel, one per group) and every decode step, beside
a request that is not spread."""

import numpy as np
import pytest
from hf_reference import relative_error
from thread_ranks import ThreadCollectives

from kernels import collectives
from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.step import KV_BLOCK, Step, spread_step
from minimax_m2.parallel import ParallelLayout

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
