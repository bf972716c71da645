"""Rows placed into fixed slots: the static-shape replacement for variable-length gathers.

Counting is done in float32 matmuls against small triangular constants, which is exact below 2^24
and means the same in NumPy and once traced (an integer cumsum would become float32, and a boolean
sum a logical OR, under nkipy).
"""

import numpy as np


def _chunk_rows(rows: int) -> int:
    """Rows per chunk: the smallest power of two whose square is at least `rows`, so both
    triangular constants of `exclusive_cumsum` hold about `rows` elements, never rows^2."""
    chunk = 1
    while chunk * chunk < rows:
        chunk *= 2
    return chunk


def _strictly_lower(n: int, like: np.ndarray) -> np.ndarray:
    """[n, n] float32 ones below the diagonal, as a value of the trace: nkipy's matmul takes no NumPy
    constant operand, so the constant is added to a zero computed from `like`."""
    return np.tril(np.ones((n, n), np.float32), -1) + np.zeros_like(like[:1, :1])


def exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    """values: [P, G] int >= 0 -> [P, G] int32, out[r, g] = sum of values[:r, g] (exact while the
    totals stay below 2^24).

    Rows are cut into chunks of C (C^2 >= P): sums inside a chunk come from a [C, C] strictly lower
    triangular matmul, sums of whole earlier chunks from a [P/C, P/C] one.
    """
    rows, groups = values.shape
    chunk = _chunk_rows(rows)
    chunks = -(-rows // chunk)
    m = np.pad(values.astype(np.float32), ((0, chunks * chunk - rows), (0, 0)))
    by_position = np.swapaxes(m.reshape(chunks, chunk, groups), 0, 1).reshape(chunk, chunks * groups)
    within = _strictly_lower(chunk, m) @ by_position  # [C, chunks * G]
    within = np.swapaxes(within.reshape(chunk, chunks, groups), 0, 1)  # [chunks, C, G]
    totals = np.sum(m.reshape(chunks, chunk, groups), axis=1)  # [chunks, G]
    before = _strictly_lower(chunks, m) @ totals  # [chunks, G]
    counts = (within + before[:, None, :]).reshape(chunks * chunk, groups)
    return counts[:rows].astype(np.int32)


def rank_within(member: np.ndarray) -> np.ndarray:
    """member: [P, G] 0/1 int, one group per row at most -> [P] int32: the row's place among the
    earlier rows of its group (0, 1, ...); 0 for rows in no group."""
    return np.sum(exclusive_cumsum(member) * member, axis=1)


def place_rows(x: np.ndarray, slot: np.ndarray, valid: np.ndarray, num_slots: int) -> np.ndarray:
    """out[slot[r]] = x[r] for every valid row r; slots no valid row names are zero.

    x: [P, n], slot: [P] int in 0..num_slots-1 (distinct among valid rows), valid: [P] bool
    -> [num_slots, n]. One scatter: invalid rows land in an extra slot that is cut off.
    """
    out = np.repeat(np.zeros_like(x[:1]), num_slots + 1, axis=0)
    out[np.where(valid, slot, num_slots)] = x
    return out[:num_slots]
