"""Rows placed into fixed slots: the static-shape replacement for variable-length gathers."""

import numpy as np


def place_rows(x: np.ndarray, slot: np.ndarray, valid: np.ndarray, num_slots: int) -> np.ndarray:
    """out[slot[r]] = x[r] for every valid row r; slots no valid row names are zero.

    x: [P, n], slot: [P] int (distinct among valid rows), valid: [P] bool -> [num_slots, n].
    """
    holds = (slot[None, :] == np.arange(num_slots)[:, None]) & valid[None, :]  # [num_slots, P]
    source = np.sum(np.where(holds, np.arange(x.shape[0])[None, :], 0), axis=1)
    return np.where(np.any(holds, axis=1)[:, None], np.take(x, source, axis=0), np.zeros_like(x[:1]))


def rank_within(member: np.ndarray) -> np.ndarray:
    """member: [P, G] 0/1 int, one group per row at most -> [P] int: the row's place among the earlier
    rows of its group (0, 1, ...), -1 for rows in no group."""
    return np.sum(np.cumsum(member, axis=0) * member, axis=1) - 1
