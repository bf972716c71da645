"""The expert schedule each target's costs choose (minimax_m2/device/expert_schedule.py)."""

import numpy as np
import pytest

from kernels.moe_grouped import DENSE, DYNAMIC, expert_blocks
from minimax_m2.device.expert_schedule import (
    BLOCK_SIZES,
    PRODUCT_SIZES,
    blocked_seconds,
    choose_block_rows,
    dynamic_seconds,
    measure_block_times,
    measure_product_times,
    measured_table,
    roofline_cost,
    rows_apart,
)
from minimax_m2.device.roofline import TRN2

# This CPU's medium-config expert (ms): one row streams the weights, BLAS packs them for two or more rows;
# an expert just read comes from the cache.
COLD = {1: 0.31, 2: 0.85, 4: 0.87, 8: 0.87, 16: 0.95, 32: 1.27, 64: 1.6, 128: 2.4}
WARM = {1: 0.19, 2: 0.4, 4: 0.41, 8: 0.42, 16: 0.5, 32: 0.8, 64: 1.2, 128: 2.0}
CPU = measured_table({b: (COLD[b], WARM[b]) for b in COLD})
NO_CACHE = measured_table(COLD)


def test_measured_table_is_exact_at_the_sizes_and_linear_beyond() -> None:
    assert CPU(8) == COLD[8] and CPU(8, repeated=True) == WARM[8]
    assert CPU(3) == pytest.approx((COLD[2] + COLD[4]) / 2)
    assert CPU(256) == pytest.approx(COLD[128] + 128 * WARM[128] / 128), "a row beyond costs a cached row at least"
    assert CPU(256, repeated=True) == pytest.approx(2 * WARM[128])
    assert NO_CACHE(16, repeated=True) == NO_CACHE(16), "without repeated times a repeat costs a read"


def test_a_larger_block_never_costs_less_than_a_smaller_one() -> None:
    """A noisy measurement of one row (5 ms, against 1 ms for two rows) must not make blocks of two rows
    look 4.5x cheaper than blocks of one at a batch-1 decode."""
    noisy = measured_table({1: (5.0, 0.2), 2: (1.0, 0.4), 4: (6.0, 0.5)})
    assert noisy(2) == 5.0 and noisy(3) == 5.5 and noisy(4) == 6.0
    assert noisy(2, repeated=True) == 0.4 and noisy(1, repeated=True) == 0.2
    assert choose_block_rows(8, 64, noisy) == 1
    flat = measured_table({b: (1.0, 0.5) for b in BLOCK_SIZES})  # a flat tail: one row as dear as 128
    assert flat(4096) == pytest.approx(1.0 + (4096 - 128) * 0.5 / 128)
    assert choose_block_rows(4096, 64, flat) != DENSE, "dense runs every expert over all 4096 rows"


def test_blocked_time_reads_at_most_one_new_expert_a_block_and_repeats_the_rest() -> None:
    blocks = expert_blocks(256, 64, 4)
    assert blocked_seconds(256, 64, 4, CPU) == pytest.approx(64 * COLD[4] + (blocks - 64) * WARM[4])
    assert blocked_seconds(8, 64, 1, CPU) == pytest.approx(8 * COLD[1]), "8 blocks, each of its own expert"


def test_a_cpu_decode_reads_the_chosen_experts_row_by_row() -> None:
    """One row streams an expert at memory speed, so the pairs of a batch-1 or batch-8 decode run as blocks
    of one row; dense would run all 64 experts over every row."""
    assert choose_block_rows(8, 64, CPU) == 1
    assert choose_block_rows(64, 64, CPU) == 1


def test_the_cache_decides_between_repeating_experts_and_padding_blocks() -> None:
    """256 pairs over 64 experts: with repeats from the cache, blocks of one row (each expert's further rows
    cache-hot); if every block read its expert from memory, fewer, larger blocks."""
    assert choose_block_rows(256, 64, CPU) == 1
    assert choose_block_rows(256, 64, NO_CACHE) == 16


def test_a_long_prefill_takes_large_blocks() -> None:
    assert choose_block_rows(4096, 64, CPU) in (32, 64)
    assert choose_block_rows(4096, 64, CPU) != DENSE


def test_a_neuron_core_decode_reads_each_chosen_expert_slice_once() -> None:
    """The real model's expert slices at moe_tp 64 on one NeuronCore: blocks of one row at batch 1; at a
    prefill, 128-row blocks (128 rows cost about one weight read)."""
    hidden, inter = 3072, 1536 // 64
    weight_bytes = 3 * hidden * inter * 2
    cost = roofline_cost(weight_bytes, 2 * 3 * hidden * inter, TRN2.memory_bytes_per_s, TRN2.matmul_flops_per_s)
    assert cost(1, repeated=True) == cost(1), "a NeuronCore block DMAs its weights whatever came before"
    assert choose_block_rows(8, 256, cost) == 1
    assert choose_block_rows(2048 * 8, 256, cost) == 128


def test_block_times_are_measured_from_memory_and_repeated() -> None:
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((4, 64, 32)).astype(np.float32), rng.standard_normal((4, 32, 32)).astype(np.float32),
               None) for _ in range(3)]
    timed = measure_block_times(layers, np.dtype(np.float32), repeats=1)
    assert sorted(timed) == list(BLOCK_SIZES)
    assert all(len(t) == 2 and min(t) > 0 for t in timed.values())


def test_a_cpu_multiplies_two_rows_apart_and_a_neuron_core_never() -> None:
    """Two rows cost a CPU's BLAS about what two single rows do (it packs the weight), so a one-request
    decode (a bucket of two rows) multiplies its rows apart; from four rows, together. A NeuronCore streams
    the weight once for any rows: always together."""
    assert rows_apart(2, CPU) and not rows_apart(1, CPU) and not rows_apart(4, CPU)
    hidden = 3072
    cost = roofline_cost(hidden * hidden * 2, 2 * hidden * hidden, TRN2.memory_bytes_per_s, TRN2.matmul_flops_per_s)
    assert not any(rows_apart(rows, cost) for rows in (2, 4, 8))


def test_this_cpu_runs_a_prefill_dynamically_and_a_decode_in_blocks_of_one_row() -> None:
    """The CPU the model runs on (its table marked dynamic) takes DYNAMIC where each expert hit multiplies
    enough rows (a prefill's thousands of pairs), and static blocks of one row where a dynamic product would
    have one or two rows an expert (a decode of 8 rows: BLAS packs the weight for two or more)."""
    cpu = measured_table({b: (COLD[b], WARM[b]) for b in COLD}, dynamic=True)
    assert choose_block_rows(64, 64, cpu) == 1
    assert choose_block_rows(1024, 64, cpu) == DYNAMIC and choose_block_rows(4096, 64, cpu) == DYNAMIC
    assert dynamic_seconds(4096, 64, cpu) < min(blocked_seconds(4096, 64, b, cpu) for b in BLOCK_SIZES)
    assert choose_block_rows(1024, 64, CPU) != DYNAMIC, "a static target never runs it"


def test_the_lm_heads_product_is_timed_on_its_own_weight() -> None:
    """On this CPU the lm_head's schedule comes from its own product's measured cost (an expert's weight sits
    in the cache where the lm_head's does not), over a weight in row order; a target that compiles takes the
    experts' costs."""
    from minimax_m2 import MiniMaxM2Model
    from minimax_m2.run import random_config

    model = MiniMaxM2Model.random(random_config(128, 1, 4, 2, 4096), seed=0, max_seq_len=32)
    model.schedule_cost()
    assert model.weights.lm_head.flags.c_contiguous and model.head_cost is not None
    timed = measure_product_times(model.weights.lm_head, np.dtype(np.float32))
    assert sorted(timed) == list(PRODUCT_SIZES) and all(t > 0 for t in timed.values())
    assert model.head_cost(8) >= model.head_cost(1) > 0
