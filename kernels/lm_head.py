"""Final norm, vocabulary projection (optionally split over ranks) and greedy pick."""

import numpy as np

from kernels.collectives import ReplicaGroups, all_gather
from kernels.matmul import matmul
from kernels.rmsnorm import rmsnorm

_MASKED = np.float32(np.finfo(np.float32).min)


def lm_head(h: np.ndarray, norm_weight: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """h: [B, S, hidden], norm_weight: [hidden], weight: [hidden, vocab] -> logits [B, S, vocab] float32."""
    return matmul(rmsnorm(h, norm_weight, eps), weight).astype(np.float32)


def greedy_pick(logits: np.ndarray) -> np.ndarray:
    """logits: [..., vocab] -> [...] index of the largest logit (first on ties)."""
    return np.argmax(logits, axis=-1)


def lm_head_vocab_parallel(
    h: np.ndarray,
    norm_weight: np.ndarray,
    weight: np.ndarray,
    vocab_offset: np.ndarray,
    *,
    eps: float,
    vocab_size: int,
    replica_groups: ReplicaGroups | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and greedy tokens with the vocabulary split over the ranks of `replica_groups`.

    h: [N, S, hidden] (the same rows on every rank), weight: [hidden, Vr] this rank's columns
    vocab_offset .. vocab_offset + Vr - 1 (zero-padded past vocab_size), vocab_offset: [1] int32.
    Returns (logits [N, S, vocab_size] float32, gathered over the ranks, and tokens [N, S] int32: the
    first index of the largest logit, chosen from each rank's own best without the full logits).
    """
    columns = weight.shape[-1]
    logits = lm_head(h, norm_weight, weight, eps)
    ids = vocab_offset + np.arange(columns, dtype=np.int32)
    logits = np.where(ids < vocab_size, logits, _MASKED)
    best = np.max(logits, axis=-1)  # [N, S]
    best_id = greedy_pick(logits).astype(np.int32) + vocab_offset  # [N, S]
    every_best = all_gather(best[None], 0, replica_groups)  # [W, N, S]
    every_id = all_gather(best_id[None], 0, replica_groups)
    winner = greedy_pick(np.transpose(every_best, (1, 2, 0)))  # [N, S], lowest rank on ties
    tokens = np.take_along_axis(every_id, winner[None], axis=0)[0]
    return all_gather(logits, 2, replica_groups)[:, :, :vocab_size], tokens
