"""The distribution the next token is drawn from, and a host-side draw from it (the reference the device
sampler `kernels.sampling` follows, and the path for rows the device does not sample)."""

import numpy as np

# a token's log-probability, and the most likely tokens' as (id, log-probability), most likely first
TokenLogprobs = tuple[float, list[tuple[int, float]]]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise for settings that do not define a distribution."""
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"invalid sampling settings temperature={temperature}, top_k={top_k}, top_p={top_p}")


def sampling_probs(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """logits [V] -> probabilities [V] (float64): softmax(logits / temperature) over the top_k most likely
    tokens, then only the most likely ones whose preceding mass is below top_p, renormalised."""
    check_sampling(temperature, top_k, top_p)
    scaled = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        scaled = np.where(scaled < np.partition(scaled, -top_k)[-top_k], -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        probs[order[before >= top_p]] = 0.0
        probs /= probs.sum()
    return probs


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprobs:
    """logits [V] -> (the log-probability of `token` under softmax(logits), the `top` most likely tokens
    with theirs, most likely first): the model's own distribution, before temperature, top-k or top-p."""
    z = logits.astype(np.float64)
    logp = z - (z.max() + np.log(np.sum(np.exp(z - z.max()))))
    best = np.argpartition(-logp, top - 1)[:top] if 0 < top < len(logp) else np.arange(len(logp))[:top]
    best = best[np.lexsort((best, -logp[best]))]
    return float(logp[token]), [(int(i), float(logp[i])) for i in best]


def draw(probs: np.ndarray, uniform: float) -> int:
    """The token at `uniform` (in [0, 1)) of the inverse CDF taken in descending order of probability (ties:
    the lower id first), as the device sampler takes it."""
    order = np.argsort(-probs, kind="stable")
    cdf = np.cumsum(probs[order])
    return int(order[min(int(np.sum(cdf < uniform * cdf[-1])), int(np.count_nonzero(probs)) - 1)])


def next_tokens(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
                uniforms: np.ndarray) -> np.ndarray:
    """logits [B, vocab], uniforms [B] in [0, 1) -> [B] token ids; temperature 0 is greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    return np.array([draw(sampling_probs(row, temperature, top_k, top_p), u) for row, u in zip(logits, uniforms)])
