"""Experts applied to rows grouped by expert (static shapes, no dropped rows)."""

import numpy as np

from kernels.moe_expert import moe_expert
from kernels.slots import exclusive_cumsum, place_rows, rank_within

MAX_BLOCK_ROWS = 128
ROWS_PER_WEIGHT_READ = 128  # rows an expert must see before its matmuls, not its weight reads, bound the time
                            # (a NeuronCore's bf16 matmul rate over its HBM bandwidth, in rows of bf16 weights)


def block_rows(rows: int, num_experts: int) -> int:
    """Rows per block B: the largest power of two <= 128 whose padding bound num_experts * (B - 1)
    is at most the rows themselves (1 when rows are few, as in decode, so each block is one row)."""
    b = 1
    while 2 * b <= MAX_BLOCK_ROWS and num_experts * (2 * b - 1) <= rows:
        b *= 2
    return b


def runs_dense(rows: int, num_experts: int) -> bool:
    """True when applying every held expert to every row costs less than the blocked schedule.

    Cost in expert weight reads, an expert applied to R rows costing max(1, R / ROWS_PER_WEIGHT_READ):
    dense reads each of the E experts once; blocked reads one expert per block. Few rows (decode)
    make dense cheaper whenever there are more blocks than experts; a tie goes to dense, which reads
    fewer bytes.
    """
    dense = num_experts * max(1.0, rows / ROWS_PER_WEIGHT_READ)
    blocked = expert_blocks(rows, num_experts) * max(1.0, block_rows(rows, num_experts) / ROWS_PER_WEIGHT_READ)
    return dense <= blocked


def expert_blocks(rows: int, num_experts: int) -> int:
    """Blocks of B rows the grouped path runs: enough for every row plus each expert's padding."""
    b = block_rows(rows, num_experts)
    return -(-(rows + num_experts * (b - 1)) // b)


def grouped_experts(x: np.ndarray, expert_ids: np.ndarray, valid: np.ndarray, w13: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Row r through expert expert_ids[r]: x [P, hidden], expert_ids [P] int in 0..E-1, valid [P] bool,
    w13 [E, hidden, 2I], w2 [E, I, hidden] -> [P, hidden] (zero rows where not valid).

    When cheaper (`runs_dense`: few rows over few experts, as in expert-parallel decode) each of the
    E experts runs on all rows and each row keeps its own expert's output: each expert is read once.
    Otherwise rows are placed expert by expert into slots, each expert's run padded to a multiple of
    B rows (a power of two), so every block of B slots belongs to one expert; at most
    P + E * (B - 1) slots are used, a bound known at trace time, so however the rows are routed none
    is dropped. Each block gathers its expert's weights by the traced block expert id and runs one
    matmul.
    """
    rows = x.shape[0]
    num_experts = w13.shape[0]
    zero = np.zeros_like(x[:1])
    if runs_dense(rows, num_experts):
        out = zero
        for e in range(num_experts):
            mine = (expert_ids == e) & valid
            out = out + np.where(mine[:, None], moe_expert(x, w13[e], w2[e]), zero)
        return out
    b = block_rows(rows, num_experts)
    num_blocks = expert_blocks(rows, num_experts)

    member = ((expert_ids[:, None] == np.arange(num_experts)[None, :]) & valid[:, None]).astype(np.int32)  # [P, E]
    padded = np.bitwise_and(np.sum(member, axis=0) + (b - 1), -b)  # [E] each run rounded up to whole blocks
    run_start = exclusive_cumsum(padded[:, None])[:, 0]  # [E]
    slot = np.sum(member * run_start[None, :], axis=1) + rank_within(member)  # [P]
    slotted = place_rows(x, slot, valid, num_blocks * b)

    run_end = run_start + padded
    block_first_slot = np.arange(num_blocks, dtype=np.int32) * b
    ended = (run_end[None, :] <= block_first_slot[:, None]).astype(np.int32)  # [blocks, E]
    block_expert = np.minimum(np.sum(ended, axis=1), num_experts - 1)
    y = np.concatenate([
        moe_expert(slotted[i * b : (i + 1) * b], w13[block_expert[i]], w2[block_expert[i]]) for i in range(num_blocks)
    ])
    return np.where(valid[:, None], np.take(y, np.where(valid, slot, 0), axis=0), zero)

