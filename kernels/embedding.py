"""Token embedding lookup."""

import numpy as np


def token_embedding(input_ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """input_ids: [B, S] int, table: [vocab, hidden] -> [B, S, hidden]."""
    return np.take(table, input_ids, axis=0)
