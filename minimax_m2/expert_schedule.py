"""Which expert schedule a layer unit uses, costed for the hardware that runs it.

`kernels.moe_grouped.grouped_experts` takes its schedule as a trace-time constant, `block_rows`: blocks of
B rows sorted by expert (B = 1, 2, 4, ... 128), or dense (every held expert over every row). The choice
minimises the worst-case step time of P rows over E experts:

    blocked(B) = expert_blocks(P, E, B) x cost(B)        dense = E x cost(P)

where cost(n) is the time of one expert applied to n rows on the target:

- a NeuronCore (`roofline_cost`, from `minimax_m2.roofline.Hardware`): the DMA of the expert's weights
  overlaps the matmuls, so cost(n) = max(weight bytes / HBM bandwidth, FLOPs / bf16 rate); 128 rows cost
  about one weight read.
- this CPU (`measured_table` of `measure_block_times`): timed once per model for the expert's own shapes. On one CPU a handful of
  rows already cost as much as the read: a one-row product streams the weights at memory speed, while
  BLAS packs the weights for any product of two or more rows (measured here: 2 to 16 rows cost about
  2.7x one row).

Both targets run the same kernel; only the constant differs. Every block size either target picks is
tested under nkipy's emulated semantics (tests/test_nkipy_semantics.py).
"""

import time
from typing import Callable

import numpy as np

from kernels.moe_expert import moe_expert
from kernels.moe_grouped import DENSE, expert_blocks

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
ExpertCost = Callable[[int], float]  # rows -> seconds for one expert applied to that many rows


def choose_block_rows(rows: int, num_experts: int, cost: ExpertCost) -> int:
    """The cheapest schedule for `rows` rows over `num_experts` experts: a block size, or DENSE (0).
    Ties go to the schedule listed first: blocks of one row, then larger blocks, then dense."""
    if num_experts == 1:
        return DENSE
    options = [(expert_blocks(rows, num_experts, b) * cost(b), b) for b in BLOCK_SIZES if b == 1 or b <= rows]
    options.append((num_experts * cost(rows), DENSE))
    return min(options, key=lambda option: option[0])[1]


def roofline_cost(weight_bytes: int, flops_per_row: int, memory_bytes_per_s: float, matmul_flops_per_s: float,
                  overlaps: bool = True) -> ExpertCost:
    """cost(n) of a roofline target: weight reads and n rows' matmuls, overlapped (NeuronCore) or added."""
    def cost(rows: int) -> float:
        memory, compute = weight_bytes / memory_bytes_per_s, rows * flops_per_row / matmul_flops_per_s
        return max(memory, compute) if overlaps else memory + compute

    return cost


def measure_block_times(w13: np.ndarray, w2: np.ndarray, repeats: int = 3) -> dict[int, float]:
    """Seconds for one expert applied to each block size of BLOCK_SIZES on this CPU, for these expert
    weights ([E, 2I', hidden], [E, hidden, I']): median of `repeats`, cycling over the experts so that
    the weights come from memory as they do in a step."""
    experts, hidden = w13.shape[0], w13.shape[2]
    rng = np.random.default_rng(0)
    timed = {}
    for b in BLOCK_SIZES:
        x = rng.standard_normal((b, hidden)).astype(w13.dtype)
        samples = []
        for r in range(repeats + 1):
            e = (r * 7 + b) % experts
            start = time.perf_counter()
            moe_expert(x, w13[e], w2[e])
            samples.append(time.perf_counter() - start)
        timed[b] = float(np.median(samples[1:]))
    return timed


def measured_table(timed: dict[int, float]) -> ExpertCost:
    """cost(n) from measured times of the block sizes: exact at them, linear between and beyond them."""
    sizes = sorted(timed)
    times = [timed[b] for b in sizes]
    slope = max(0.0, (times[-1] - times[-2]) / (sizes[-1] - sizes[-2]))

    def cost(rows: int) -> float:
        if rows >= sizes[-1]:
            return times[-1] + slope * (rows - sizes[-1])
        return float(np.interp(rows, sizes, times))

    return cost
