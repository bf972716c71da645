"""Host-side choice of the next token from logits: greedy, or temperature / top-k / top-p sampling."""

import numpy as np

from kernels import greedy_pick


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise for settings that do not define a distribution."""
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"invalid sampling settings temperature={temperature}, top_k={top_k}, top_p={top_p}")


def next_tokens(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """logits: [B, vocab] -> [B] token ids. temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return greedy_pick(logits)
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        outside = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        np.put_along_axis(probs, order, np.where(outside, 0.0, sorted_probs), axis=-1)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in probs])
