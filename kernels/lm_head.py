"""Final norm, vocabulary projection and greedy pick."""

import numpy as np

from kernels.rmsnorm import rmsnorm


def lm_head(h: np.ndarray, norm_weight: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """h: [B, S, hidden], norm_weight: [hidden], weight: [hidden, vocab] -> logits [B, S, vocab] float32."""
    return rmsnorm(h, norm_weight, eps) @ weight


def greedy_pick(logits: np.ndarray) -> np.ndarray:
    """logits: [B, vocab] -> [B] index of the largest logit (first on ties)."""
    return np.argmax(logits, axis=-1)
