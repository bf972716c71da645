"""Experts applied to rows grouped by expert (static shapes, no dropped rows).

The schedule is a trace-time constant, `block_rows`, chosen by the caller for the hardware that runs it
(`minimax_m2.device.expert_schedule`):

- `block_rows = B > 0`: rows are sorted by expert into slots, each expert's run padded to a multiple of B,
  so that every block of B slots belongs to one expert; each block gathers its expert's weights by the
  block's traced expert id and runs one matmul. At most P + E * (B - 1) slots, so `expert_blocks(P, E, B)`
  blocks, is known at trace time whatever the routing: no row is ever dropped. B = 1 reads one expert
  per row, consecutive rows of one expert in turn (a CPU reads the repeats from its cache).
- `block_rows = 0` (dense): each of the E experts runs on all rows and each row keeps its own expert's
  output: every expert is read exactly once, whatever the routing.
- `block_rows = DYNAMIC` (a CPU only, never traced): the valid rows are sorted by expert and each expert
  hit multiplies its own rows once (what transformers' loop over the experts hit does): no padding, no
  expert read for nothing, but shapes that depend on the routing, which no compiled program can have.

With FP8 weights (`scales` given) w13 and w2 hold float8_e4m3fn codes, and each expert's weights are
dequantised (`kernels.fp8.dequantize`) where the expert is read: one expert at a time, never all at once.
"""

import numpy as np

from kernels.fp8 import dequantize
from kernels.moe_expert import moe_expert
from kernels.slots import exclusive_cumsum, place_rows, rank_within

DENSE = 0
DYNAMIC = -1


def expert_blocks(rows: int, num_experts: int, block_rows: int) -> int:
    """Blocks of `block_rows` rows the blocked schedule runs for `rows` rows over `num_experts` experts:
    enough for every row plus each expert's padding (the worst case of any routing)."""
    return -(-(rows + num_experts * (block_rows - 1)) // block_rows)


def expert_weights(w13: np.ndarray, w2: np.ndarray, e, scales: tuple[np.ndarray, np.ndarray] | None,
                   dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Expert e's (w13, w2) (e an int or a traced int32 scalar), dequantised to `dtype` when they are FP8
    codes with block `scales` (each [E, rows / r, cols / c])."""
    if scales is None:
        return w13[e], w2[e]
    return dequantize(w13[e], scales[0][e], dtype), dequantize(w2[e], scales[1][e], dtype)


def _experts_hit(x: np.ndarray, expert_ids: np.ndarray, valid: np.ndarray, w13: np.ndarray, w2: np.ndarray,
                 scales: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The DYNAMIC schedule (host NumPy, value-dependent shapes: never traced): each expert hit applied once
    to the valid rows routed to it, in expert order."""
    out = np.zeros_like(x)
    rows = np.flatnonzero(valid)
    rows = rows[np.argsort(expert_ids[rows], kind="stable")]
    for group in np.split(rows, np.flatnonzero(np.diff(expert_ids[rows])) + 1):
        if group.size:
            out[group] = moe_expert(x[group], *expert_weights(w13, w2, int(expert_ids[group[0]]), scales, x.dtype))
    return out


def grouped_experts(x: np.ndarray, expert_ids: np.ndarray, valid: np.ndarray, w13: np.ndarray, w2: np.ndarray, *,
                    block_rows: int, real_rows: int | None = None,
                    scales: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Row r through expert expert_ids[r]: x [P, hidden], expert_ids [P] int in 0..E-1, valid [P] bool,
    w13 [E, 2I, hidden], w2 [E, hidden, I] -> [P, hidden] (zero rows where not valid); block_rows: the
    schedule (see the module docstring); real_rows: at most this many rows are valid (rows padding a
    bucket never are), which bounds the blocks (default: P); scales: w13's and w2's FP8 block scales when
    they hold float8_e4m3fn codes."""
    if block_rows == DYNAMIC:
        return _experts_hit(x, expert_ids, valid, w13, w2, scales)
    rows = x.shape[0] if real_rows is None else min(real_rows, x.shape[0])
    num_experts = w13.shape[0]
    zero = np.zeros_like(x[:1])
    if block_rows == DENSE:
        out = zero
        for e in range(num_experts):
            mine = (expert_ids == e) & valid
            out = out + np.where(mine[:, None], moe_expert(x, *expert_weights(w13, w2, e, scales, x.dtype)), zero)
        return out
    b = block_rows
    num_blocks = expert_blocks(rows, num_experts, b)

    ids = np.arange(num_experts, dtype=np.int32)
    member = ((expert_ids[:, None] == ids[None, :]) & valid[:, None]).astype(np.int32)
    padded = np.bitwise_and(np.sum(member, axis=0) + (b - 1), -b)  # [E] each run rounded up to whole blocks
    run_start = exclusive_cumsum(padded[:, None])[:, 0]  # [E]
    slot = np.sum(member * run_start[None, :], axis=1) + rank_within(member)  # [P]
    slotted = place_rows(x, slot, valid, num_blocks * b)

    run_end = run_start + padded
    block_first_slot = np.arange(num_blocks, dtype=np.int32) * b
    ended = (run_end[None, :] <= block_first_slot[:, None]).astype(np.int32)  # [blocks, E]
    block_expert = np.minimum(np.sum(ended, axis=1), num_experts - 1)
    y = np.concatenate([
        moe_expert(slotted[i * b : (i + 1) * b], *expert_weights(w13, w2, block_expert[i], scales, x.dtype))
        for i in range(num_blocks)
    ])
    return np.where(valid[:, None], np.take(y, np.where(valid, slot, 0), axis=0), zero)
