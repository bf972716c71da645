"""The expert-parallel MoE block over W ranks (threads) equals the single-rank block, drops nothing
at the worst-case capacity, and reports what a smaller capacity drops."""

import numpy as np
import pytest
from thread_ranks import ThreadCollectives

from kernels import collectives, moe_block
from kernels.moe_dispatch import moe_block_ep, worst_case_capacity

HIDDEN, INTER, EXPERTS, TOP_K, TOKENS = 16, 8, 8, 4, 6


def _weights(seed: int = 0, bias_shift: float = 0.0):
    rng = np.random.default_rng(seed)
    gate = rng.standard_normal((HIDDEN, EXPERTS)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(EXPERTS)).astype(np.float32)
    bias[:TOP_K] += bias_shift
    w13 = (0.3 * rng.standard_normal((EXPERTS, HIDDEN, 2 * INTER))).astype(np.float32)
    w2 = (0.3 * rng.standard_normal((EXPERTS, INTER, HIDDEN))).astype(np.float32)
    x = rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32)
    return x, gate, bias, w13, w2


def _run_ep(world: int, tp: int, bias_shift: float = 0.0, capacity: int | None = None):
    x, gate, bias, w13, w2 = _weights(bias_shift=bias_shift)
    local = EXPERTS // world
    ep_groups = [list(range(world))]
    tp_groups = [list(range(g, g + tp)) for g in range(0, world, tp)]
    cap = capacity or worst_case_capacity(TOKENS, TOP_K // tp, local)
    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(lambda r: moe_block_ep(
            x, np.ones(TOKENS, bool), gate, bias, w13[r * local : (r + 1) * local], w2[r * local : (r + 1) * local],
            np.arange(r % tp, TOP_K, tp), top_k=TOP_K, capacity=cap, ep_groups=ep_groups, tp_groups=tp_groups,
        ))
    finally:
        collectives.set_backend(None)
    return moe_block(x, gate, bias, w13, w2, top_k=TOP_K), results


@pytest.mark.parametrize("world, tp", [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (4, 4)])
@pytest.mark.parametrize("bias_shift", [0.0, 100.0], ids=["spread", "all-on-rank-0"])
def test_matches_single_rank(world, tp, bias_shift) -> None:
    want, results = _run_ep(world, tp, bias_shift)
    for rank, (got, dropped) in enumerate(results):
        assert int(dropped) == 0
        err = np.max(np.abs(got - want)) / np.max(np.abs(want))
        assert err < 1e-5, f"rank {rank}: relative error {err:.2e}"


def test_small_capacity_reports_drops() -> None:
    """Every token chooses experts 0..3, all on rank 0 of 2: capacity 2 keeps 2 pairs per source rank."""
    want, results = _run_ep(2, 1, bias_shift=100.0, capacity=2)
    assert [int(d) for _, d in results] == [TOKENS * TOP_K - 2] * 2
    assert np.max(np.abs(results[0][0] - want)) > 1e-3


class _CountingSends(ThreadCollectives):
    """Counts the occupied rows (tag column > 0) of every first all_to_all send buffer."""

    def __init__(self, world: int):
        super().__init__(world)
        self.sent_rows = [0] * world

    def all_to_all(self, x, split_dimension, concat_dimension, replica_groups):
        if x.shape[-1] == HIDDEN + 1:
            self.sent_rows[self._local.rank] += int(np.sum(x[..., HIDDEN] > 0))
        return super().all_to_all(x, split_dimension, concat_dimension, replica_groups)


def test_padding_rows_are_never_dispatched() -> None:
    """Rows that only pad the batch (token_valid False) send no pair and come back as zeros."""
    x, gate, bias, w13, w2 = _weights()
    world, local = 2, EXPERTS // 2
    valid = np.arange(TOKENS) < 2
    backend = _CountingSends(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(lambda r: moe_block_ep(
            x, valid, gate, bias, w13[r * local : (r + 1) * local], w2[r * local : (r + 1) * local], np.arange(TOP_K),
            top_k=TOP_K, capacity=worst_case_capacity(TOKENS, TOP_K, local), ep_groups=[[0, 1]],
        ))
    finally:
        collectives.set_backend(None)
    assert backend.sent_rows == [2 * TOP_K] * world
    want = moe_block(x[:2], gate, bias, w13, w2, top_k=TOP_K)
    for got, dropped in results:
        assert int(dropped) == 0
        assert np.max(np.abs(got[:2] - want)) / np.max(np.abs(want)) < 1e-5
        assert not np.any(got[2:])
