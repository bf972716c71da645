"""Sparse MoE block on one rank: router, experts and weighted combine for all tokens at once."""

import numpy as np

from kernels.moe_grouped import grouped_experts
from kernels.moe_router import moe_router


def moe_block(
    x: np.ndarray, valid: np.ndarray, gate: np.ndarray, bias: np.ndarray, w13: np.ndarray, w2: np.ndarray, *,
    top_k: int, block_rows: int, real_pairs: int | None = None, scales: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """x: [T, hidden], valid: [T] bool (padding tokens never reach an expert; their output is zero)
    -> [T, hidden] in x's dtype.

    gate: [hidden, E] float32, bias: [E] float32, w13: [E, 2I, hidden], w2: [E, hidden, I] for the E
    experts held (all of them, or a loaded subset: routing then chooses among those only), float8_e4m3fn
    codes when their FP8 block `scales` are given (`kernels.moe_grouped.grouped_experts`).

    Each token's top_k (token, expert) pairs run through grouped_experts (schedule `block_rows`; at most
    real_pairs of them valid, all when None), which never drops a pair, then are summed with the router
    weights (cast to x's dtype).
    """
    weights, experts = moe_router(x, gate, bias, top_k)
    tokens, hidden = x.shape
    pairs = np.repeat(x, top_k, axis=0)
    y = grouped_experts(pairs, experts.reshape(-1), np.repeat(valid, top_k), w13, w2, block_rows=block_rows,
                        real_rows=real_pairs, scales=scales)
    return np.sum(y.reshape(tokens, top_k, hidden) * weights.astype(x.dtype)[:, :, None], axis=1)
