"""The MoE block over W ranks (threads) equals the single-rank block for every layout: experts spread
(moe_tp 1), sliced over all ranks (moe_tp W) and mixed, with attention tp 1, 2, 4; nothing is dropped at
the worst-case capacity, padding rows are never run, and a smaller capacity reports what it drops."""

import numpy as np
import pytest
from thread_ranks import ThreadCollectives

from kernels import DENSE, DYNAMIC, collectives, moe_block
from kernels.moe_parallel import moe_block_parallel
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.program import RankValues
from minimax_m2.parallel import ParallelLayout

HIDDEN, INTER, EXPERTS, TOP_K, TOKENS = 16, 8, 8, 4, 6
CONFIG = MiniMaxM2Config(vocab_size=32, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=4, num_local_experts=EXPERTS,
                         num_experts_per_tok=TOP_K, rotary_dim=4)


def _weights(bias_shift: float = 0.0):
    rng = np.random.default_rng(0)
    gate = rng.standard_normal((HIDDEN, EXPERTS)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(EXPERTS)).astype(np.float32)
    bias[:TOP_K] += bias_shift
    w13 = (0.3 * rng.standard_normal((EXPERTS, 2 * INTER, HIDDEN))).astype(np.float32)
    w2 = (0.3 * rng.standard_normal((EXPERTS, HIDDEN, INTER))).astype(np.float32)
    x = rng.standard_normal((4, TOKENS, HIDDEN)).astype(np.float32)  # one row block per attention group
    return x, gate, bias, w13, w2


def _rank_weights(layout: ParallelLayout, w13: np.ndarray, w2: np.ndarray):
    """This rank's experts, and its slice of their intermediate dimension."""
    experts = layout.local_experts(list(range(EXPERTS)))
    part = layout.intermediate_slice(INTER)
    gate_up = np.concatenate([w13[experts][:, :INTER][:, part], w13[experts][:, INTER:][:, part]], axis=1)
    return gate_up, w2[experts][:, :, part]


def run_layout(world: int, tp: int, moe_tp: int, bias_shift: float = 0.0, capacity: int | None = None,
               valid_rows: int = TOKENS, backend_type=ThreadCollectives, block_rows: int = 1, copies: int = 1):
    """copies: the attention tp ranks of a group each send 1 / copies of its rows, gathered once (the layer's
    scattered exchange), rather than all of them."""
    x, gate, bias, w13, w2 = _weights(bias_shift)

    def rank(r: int):
        layout = ParallelLayout(world, tp, r, moe_tp=moe_tp)
        values = RankValues.of(CONFIG, layout)
        rows = np.array([m * TOKENS + t for m in range(moe_tp) for t in range(valid_rows)], np.int32)
        local_w13, local_w2 = _rank_weights(layout, w13, w2)
        share = TOKENS // copies
        mine = x[layout.group][layout.tp_rank % copies * share : (layout.tp_rank % copies + 1) * share]
        return moe_block_parallel(
            collectives.all_gather(mine, 0, layout.slice_groups), rows, rows // TOKENS,
            np.ones(len(rows), bool), values.member_slots, values.own_members,
            values.own_position, gate, bias, local_w13, local_w2, top_k=TOP_K, members=moe_tp, per_token=TOP_K // tp,
            own_count=len(layout.own_members()), real_pairs=len(rows) * (TOP_K // tp),
            capacity=capacity or layout.capacity(len(rows), TOP_K, local_w13.shape[0]), block_rows=block_rows,
            slice_groups=layout.slice_groups, ep_groups=layout.ep_groups, combine_groups=layout.combine_groups,
            copies=copies,
        )

    backend = backend_type(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(rank)
    finally:
        collectives.set_backend(None)
    want = [moe_block(x[g, :valid_rows], np.ones(valid_rows, bool), gate, bias, w13, w2, top_k=TOP_K, block_rows=1)
            for g in range(world // tp)]
    return want, results, backend


LAYOUTS = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (2, 2, 1), (4, 2, 1), (4, 4, 1), (2, 1, 2), (2, 2, 2), (4, 1, 4),
           (4, 2, 4), (4, 4, 4), (4, 1, 2), (4, 2, 2), (4, 4, 2)]


@pytest.mark.parametrize("world, tp, moe_tp", LAYOUTS, ids=[f"w{w}-tp{t}-moetp{m}" for w, t, m in LAYOUTS])
@pytest.mark.parametrize("bias_shift", [0.0, 100.0], ids=["spread", "all-on-rank-0"])
@pytest.mark.parametrize("block_rows", [1, 8, 0, DYNAMIC], ids=["blocks-of-1", "blocks-of-8", "dense", "dynamic"])
def test_matches_single_rank(world, tp, moe_tp, bias_shift, block_rows) -> None:
    want, results, _ = run_layout(world, tp, moe_tp, bias_shift, block_rows=block_rows)
    for rank, (got, dropped) in enumerate(results):
        assert int(dropped[0]) == 0
        expected = want[rank // tp]
        err = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
        assert err < 1e-5, f"rank {rank}: relative error {err:.2e}"


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 2, 2), (4, 2, 2), (4, 2, 4)])
def test_tokens_gathered_once_for_their_copies_are_routed_once_and_match(world, tp, moe_tp) -> None:
    """The attention tp ranks of a group send a share of its rows each (copies = tp): every union row is a
    copy of a gathered token, which is routed once (fewer rows than the union) and matches one rank."""
    want, results, _ = run_layout(world, tp, moe_tp, copies=tp)
    for rank, (got, dropped) in enumerate(results):
        assert int(dropped[0]) == 0
        expected = want[rank // tp]
        assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) < 1e-5, f"rank {rank}"


@pytest.mark.parametrize("world, tp, moe_tp", LAYOUTS, ids=[f"w{w}-tp{t}-moetp{m}" for w, t, m in LAYOUTS])
def test_the_cpus_dynamic_schedule_equals_the_static_ones(world, tp, moe_tp) -> None:
    """Each rank's experts (sliced or spread) applied by the CPU's DYNAMIC schedule give every static
    schedule's result within 1e-6 relative in float32."""
    _, dynamic, _ = run_layout(world, tp, moe_tp, 0.0, block_rows=DYNAMIC)
    for block_rows in (1, 8, DENSE):
        _, static, _ = run_layout(world, tp, moe_tp, 0.0, block_rows=block_rows)
        for rank, ((got, _), (want, _)) in enumerate(zip(dynamic, static)):
            err = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert err < 1e-6, f"rank {rank}, blocks of {block_rows}: relative error {err:.2e}"


@pytest.mark.parametrize("block_rows", [1, DYNAMIC], ids=["blocks-of-1", "dynamic"])
def test_small_capacity_reports_drops(block_rows) -> None:
    """Every token chooses experts 0..3, all on rank 0 of 2: capacity 2 keeps 2 pairs per source rank."""
    want, results, _ = run_layout(2, 1, 1, bias_shift=100.0, capacity=2, block_rows=block_rows)
    assert [int(d[0]) for _, d in results] == [TOKENS * TOP_K - 2] * 2
    assert np.max(np.abs(results[0][0] - want[0])) > 1e-3


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
    """Rows that only pad the batch (left out of union_rows) send no pair and come back as zeros."""
    want, results, backend = run_layout(2, 1, 1, valid_rows=2, backend_type=_CountingSends)
    assert backend.sent_rows == [2 * TOP_K] * 2
    for rank, (got, dropped) in enumerate(results):
        assert int(dropped[0]) == 0
        assert np.max(np.abs(got[:2] - want[rank])) / np.max(np.abs(want[rank])) < 1e-5
        assert not np.any(got[2:])
