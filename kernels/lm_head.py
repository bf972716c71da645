"""Final norm, vocabulary projection (optionally split over ranks) and greedy pick."""

import numpy as np

from kernels.collectives import ReplicaGroups, all_gather
from kernels.matmul import matmul
from kernels.rmsnorm import rmsnorm

_MASKED = np.float32(np.finfo(np.float32).min)


def lm_head(h: np.ndarray, norm_weight: np.ndarray, weight: np.ndarray, eps: float,
            rows_apart: bool = False) -> np.ndarray:
    """h: [..., hidden], norm_weight: [hidden], weight: [hidden, vocab] -> logits [..., vocab] float32
    (rows_apart: the product's schedule, `kernels.matmul.matmul`)."""
    return matmul(rmsnorm(h, norm_weight, eps), weight, rows_apart).astype(np.float32)


def greedy_pick(logits: np.ndarray) -> np.ndarray:
    """logits: [..., vocab] -> [...] index of the largest logit (first on ties)."""
    return np.argmax(logits, axis=-1)


def vocab_slice_logits(h: np.ndarray, norm_weight: np.ndarray, weight: np.ndarray, vocab_offset: np.ndarray, *,
                       eps: float, vocab_size: int, rows_apart: bool = False) -> np.ndarray:
    """h: [N, hidden] -> this rank's logits [N, Vr] float32 for columns vocab_offset[0] .. + Vr - 1 of the
    vocabulary (weight: [hidden, Vr], zero-padded past vocab_size; the padding columns masked)."""
    logits = lm_head(h, norm_weight, weight, eps, rows_apart)
    ids = vocab_offset[0] + np.arange(weight.shape[-1], dtype=np.int32)
    return np.where(ids[None, :] < vocab_size, logits, _MASKED)


def greedy_vocab_parallel(logits: np.ndarray, vocab_offset: np.ndarray,
                          replica_groups: ReplicaGroups | None) -> np.ndarray:
    """[N, Vr] this rank's slice of the logits -> [N] int32: the first index of the largest logit of the
    whole vocabulary, chosen from each rank's own best without the full logits (lowest rank on ties)."""
    every_best = all_gather(np.max(logits, axis=-1)[:, None], 1, replica_groups)  # [N, W]
    every_id = all_gather((greedy_pick(logits).astype(np.int32) + vocab_offset[0])[:, None], 1, replica_groups)
    return np.take_along_axis(every_id, greedy_pick(every_best)[:, None].astype(np.int32), axis=1)[:, 0]


def gather_vocab(logits: np.ndarray, vocab_size: int, replica_groups: ReplicaGroups | None) -> np.ndarray:
    """[N, Vr] slices of every rank -> the whole logits [N, vocab_size]."""
    return all_gather(logits, 1, replica_groups)[:, :vocab_size]
