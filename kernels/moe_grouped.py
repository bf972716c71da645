"""Experts applied to rows grouped by expert into fixed-size blocks (static shapes, no dropped rows)."""

import numpy as np

from kernels.moe_expert import moe_expert
from kernels.slots import place_rows, rank_within

MAX_BLOCK_ROWS = 128


def block_rows(rows: int, num_experts: int) -> int:
    """Rows per block B: the largest power of two <= 128 whose padding bound num_experts * (B - 1)
    is at most the rows themselves (1 when rows are few, as in decode, so each block is one row)."""
    b = 1
    while 2 * b <= MAX_BLOCK_ROWS and num_experts * (2 * b - 1) <= rows:
        b *= 2
    return b


def grouped_experts(x: np.ndarray, expert_ids: np.ndarray, valid: np.ndarray, w13: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Row r through expert expert_ids[r]: x [P, hidden], expert_ids [P] int in 0..E-1, valid [P] bool,
    w13 [E, hidden, 2I], w2 [E, I, hidden] -> [P, hidden] (zero rows where not valid).

    Rows are placed expert by expert into slots, each expert's run padded to a multiple of B rows, so
    every block of B slots belongs to one expert. At most P + E * (B - 1) slots are used, a bound
    known at trace time: however the rows are routed, none is dropped. Each block gathers its
    expert's weights by the traced block expert id (a view on CPU) and runs one matmul.
    """
    rows = x.shape[0]
    num_experts = w13.shape[0]
    b = block_rows(rows, num_experts)
    num_blocks = -(-(rows + num_experts * (b - 1)) // b)

    member = ((expert_ids[:, None] == np.arange(num_experts)[None, :]) & valid[:, None]).astype(np.int32)  # [P, E]
    padded = (np.sum(member, axis=0) + (b - 1)) // b * b  # [E]
    run_end = np.cumsum(padded)  # [E]
    slot = np.sum(member * (run_end - padded)[None, :], axis=1) + rank_within(member)  # [P]
    slotted = place_rows(x, slot, valid, num_blocks * b)

    block_expert = np.minimum(np.sum(run_end[None, :] <= (np.arange(num_blocks) * b)[:, None], axis=1), num_experts - 1)
    y = np.concatenate([
        moe_expert(slotted[i * b : (i + 1) * b], w13[block_expert[i]], w2[block_expert[i]]) for i in range(num_blocks)
    ])
    return np.where(valid[:, None], np.take(y, np.maximum(slot, 0), axis=0), np.float32(0.0))
