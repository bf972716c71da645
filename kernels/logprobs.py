"""Log-probabilities on the device: of each chosen token and of the most likely ones, from vocabulary slices.

log p(t) = logit(t) - log sum_v exp(logit(v)); the normaliser is assembled from each rank's largest logit
and its sum of exp below it, so no rank needs the whole vocabulary's logits.
"""

import numpy as np

from kernels.collectives import ReplicaGroups, all_gather
from kernels.sampling import top_vocab_parallel

_MASKED = np.float32(np.finfo(np.float32).min)


def log_normaliser(logits: np.ndarray, replica_groups: ReplicaGroups | None) -> np.ndarray:
    """[N, Vr] this rank's slice of the logits (padding masked) -> [N, 1] log sum exp over the whole
    vocabulary: log sum_r exp(m_r) s_r with m_r each slice's largest logit and s_r = sum exp(logits - m_r)."""
    best = np.max(logits, axis=-1, keepdims=True)
    total = np.sum(np.exp(logits - best), axis=-1, keepdims=True)
    every_best = all_gather(best, 1, replica_groups)  # [N, W]
    every_total = all_gather(total, 1, replica_groups)
    top = np.max(every_best, axis=-1, keepdims=True)
    return top + np.log(np.sum(every_total * np.exp(every_best - top), axis=-1, keepdims=True))


def logprobs_vocab_parallel(logits: np.ndarray, vocab_offset: np.ndarray, chosen: np.ndarray, *, top: int,
                            replica_groups: ReplicaGroups | None,
                            partial_sort: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits [N, Vr]: this rank's slice, columns vocab_offset[0] .. + Vr - 1 (padding masked); chosen [N]
    int32 -> (log-probability of each chosen token [N] float32, the `top` largest log-probabilities [N, top]
    descending, their ids [N, top] int32), identical on every rank (partial_sort: how the largest are found,
    `kernels.sampling.top_candidates`)."""
    columns = logits.shape[-1]
    norm = log_normaliser(logits, replica_groups)
    local = chosen - vocab_offset[0]
    held = (local >= 0) & (local < columns)
    value = np.take_along_axis(logits, np.clip(local, 0, columns - 1)[:, None], axis=1)
    chosen_logit = np.max(all_gather(np.where(held[:, None], value, _MASKED), 1, replica_groups), axis=-1)
    values, best = top_vocab_parallel(logits, vocab_offset, top, replica_groups, partial_sort)
    return chosen_logit - norm[:, 0], values - norm, best
