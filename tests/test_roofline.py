"""The roofline projection counts what the recorded program reads, computes and exchanges."""

import dataclasses

import numpy as np
import pytest

from minimax_m2.device.nkipy_semantics import Collective
from minimax_m2.device.roofline import TRN2, UnitCost, fastest_moe_tp, record_units, static_expert_floor, step_seconds
from minimax_m2.parallel import ParallelLayout
from minimax_m2.run import random_config

CONFIG = random_config(128, 2, 16, 2, 256)  # 16 experts, top 2, intermediate 64
EXPERT_BYTES = 3 * CONFIG.hidden_size * CONFIG.intermediate_size * 4  # w1, w3, w2 in float32


def decode_layer(world: int, moe_tp: int, tp: int = 1, batch: int = 1) -> UnitCost:
    costs = record_units(CONFIG, ParallelLayout(world, tp, 0, moe_tp=moe_tp), phase="decode", batch=batch, seq=1,
                         context=16, dtype=np.dtype(np.float32))
    return costs[1]


def test_one_rank_reads_the_chosen_experts() -> None:
    layer = decode_layer(1, 1)
    assert layer.expert_bytes == CONFIG.num_experts_per_tok * EXPERT_BYTES
    assert not layer.collectives


def test_sliced_experts_read_a_slice_of_each_chosen_expert() -> None:
    layer = decode_layer(4, 4)
    assert layer.expert_bytes == CONFIG.num_experts_per_tok * EXPERT_BYTES // 4
    assert "all_to_all" not in {c.name for c in layer.collectives}


def test_expert_parallel_reads_at_most_its_experts_and_exchanges_pairs_twice() -> None:
    """4 ranks of 4 experts; 4 x 2 received slots (capacity: 1 token x 2 choices): each held expert once."""
    layer = decode_layer(4, 1)
    assert layer.expert_bytes == 4 * EXPERT_BYTES
    exchanges = [c for c in layer.collectives if c.name == "all_to_all"]
    assert [c.payload_bytes for c in exchanges] == [4 * 2 * (CONFIG.hidden_size + 1) * 4,
                                                    4 * 2 * CONFIG.hidden_size * 4]


def test_memory_and_matmul_overlap_only_where_the_hardware_says() -> None:
    cost = UnitCost("u", bytes_read=2_000, expert_bytes=0, flops=3_000, ops=0, collectives=[])
    hw = dataclasses.replace(TRN2, memory_bytes_per_s=1_000.0, matmul_flops_per_s=1_000.0)
    assert cost.seconds(hw) == pytest.approx(3.0)
    assert cost.seconds(dataclasses.replace(hw, overlaps_memory_and_compute=False)) == pytest.approx(5.0)


def test_collectives_cost_latency_and_link_time_by_chip() -> None:
    """An all_reduce of 4 ranks sends 2 x 3/4 of its payload; across chips it uses the slower link."""
    hw = dataclasses.replace(TRN2, collective_latency_s=1.0, local_link_bytes_per_s=1_000.0,
                             remote_link_bytes_per_s=100.0, ranks_per_chip=4)
    within = UnitCost("u", 0, 0, 0, 0, [Collective("all_reduce", 1_000, ((0, 1, 2, 3),))])
    across = UnitCost("u", 0, 0, 0, 0, [Collective("all_reduce", 1_000, ((0, 4, 8, 12),))])
    assert within.seconds(hw) == pytest.approx(1.0 + 1.5)
    assert across.seconds(hw) == pytest.approx(1.0 + 15.0)


def test_step_is_embedding_layers_and_head() -> None:
    costs = record_units(CONFIG, ParallelLayout(1, 1, 0), phase="decode", batch=1, seq=1, context=16)
    embedding, layer, head = (c.seconds(TRN2) for c in costs)
    assert step_seconds(costs, CONFIG.num_hidden_layers, TRN2) == pytest.approx(embedding + 2 * layer + head)


def test_batch_one_prefers_experts_sliced_over_every_rank() -> None:
    assert fastest_moe_tp(CONFIG, 4, 1, batch=1, context=16, num_experts=16) == 4


@pytest.mark.parametrize("world, moe_tp", [(1, 1), (4, 4), (4, 1), (4, 2)])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_no_program_reads_fewer_experts_than_the_static_floor(world, moe_tp, batch) -> None:
    """The floor is what some routing of the batch needs: the recorded program reads at least that, and
    exactly that once every held expert can be chosen (a single rank at batch 16: 32 pairs, 16 experts)."""
    layout = ParallelLayout(world, 1, 0, moe_tp=moe_tp)
    floor = static_expert_floor(CONFIG, layout, batch, EXPERT_BYTES // moe_tp)
    layer = decode_layer(world, moe_tp, batch=batch)
    assert layer.expert_bytes >= floor
    if world == 1 and batch == 16:
        assert layer.expert_bytes == floor == CONFIG.num_local_experts * EXPERT_BYTES


def test_sliced_experts_all_reduce_one_row_per_token_not_per_tp_copy() -> None:
    """Attention tp 2 inside a slice group of 4: the tp copies of a token carry different choices, summed
    on each rank before the slice group's all_reduce, so it carries each of the step's tokens once."""
    config = random_config(256, 2, 16, 2, 256)  # 2 KV heads: attention tp 2
    layer = record_units(config, ParallelLayout(4, 2, 0, moe_tp=4), phase="decode", batch=8, seq=1, context=16,
                         dtype=np.dtype(np.float32))[1]
    tokens = 8  # 2 attention groups of 4 rows
    reduces = [c for c in layer.collectives if c.name == "all_reduce" and len(c.replica_groups[0]) == 4]
    assert max(c.payload_bytes for c in reduces) == tokens * config.hidden_size * 4
