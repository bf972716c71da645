"""Sparse MoE block: router, experts and weighted combine for all tokens at once."""

import numpy as np

from kernels.moe_expert import moe_expert
from kernels.moe_router import moe_router


def combine_matrix(weights: np.ndarray, experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Dense routing matrix [T, E]: entry (t, e) is token t's weight for expert e, 0 if not chosen.

    weights, experts: [T, top_k].
    """
    one_hot = experts[:, :, None] == np.arange(num_experts)[None, None, :]
    return np.sum(np.where(one_hot, weights[:, :, None], np.float32(0.0)), axis=1)


def moe_block(
    x: np.ndarray, gate: np.ndarray, bias: np.ndarray, w13: np.ndarray, w2: np.ndarray, *, top_k: int
) -> np.ndarray:
    """x: [T, hidden] -> [T, hidden].

    gate: [hidden, E], bias: [E], w13: [E, hidden, 2I], w2: [E, I, hidden] for the E experts held
    (all of them, or a loaded subset: routing then chooses among those only).

    The static shape picks the schedule: when fewer (token, expert) pairs are routed than experts
    are held (decode), each pair gathers its expert's weights; otherwise (prefill) every expert runs
    on every token and the dense combine matrix zeroes the unchosen ones. Both are exact.
    """
    weights, experts = moe_router(x, gate, bias, top_k)
    tokens, hidden = x.shape
    num_experts = w13.shape[0]

    if tokens * top_k < num_experts:
        chosen = experts.reshape(-1)
        pairs = np.repeat(x, top_k, axis=0)[:, None, :]
        y = moe_expert(pairs, np.take(w13, chosen, axis=0), np.take(w2, chosen, axis=0))
        return np.sum(y.reshape(tokens, top_k, hidden) * weights[:, :, None], axis=1)

    y = moe_expert(x[None, :, :], w13, w2)
    combine = combine_matrix(weights, experts, num_experts)
    return np.sum(y * np.transpose(combine)[:, :, None], axis=0)
