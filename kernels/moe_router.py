"""Sigmoid top-k router with a selection-only score correction bias."""

import numpy as np


def moe_router(x: np.ndarray, gate: np.ndarray, bias: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick top_k experts per token and their combine weights.

    x: [T, hidden], gate: [hidden, E] float32, bias: [E] (e_score_correction_bias).
    Returns (weights [T, top_k] float32, experts [T, top_k] int, column indices of `gate`).

    s = sigmoid(x @ gate) in float32; the top_k of (s + bias) are chosen; the weights are the
    *unbiased* s of the chosen experts, renormalised to sum to 1. Sigmoid scores are per expert, so
    passing only some experts' columns is exactly masking the others out before the top-k.
    """
    scores = 1.0 / (1.0 + np.exp(-(x.astype(np.float32) @ gate)))
    choice = scores + bias
    expert_ids = np.arange(gate.shape[-1], dtype=np.int32)[None, :]
    chosen = []
    for _ in range(top_k):
        best = np.argmax(choice, axis=-1).astype(np.int32)
        chosen.append(best)
        choice = np.where(expert_ids == best[:, None], -np.inf, choice)
    experts = np.stack(chosen, axis=-1)
    weights = np.take_along_axis(scores, experts, axis=-1)
    return weights / np.sum(weights, axis=-1, keepdims=True), experts
