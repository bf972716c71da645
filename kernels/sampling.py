"""Choosing the next token on the device: greedy, or temperature / top-k / top-p sampling.

Sampling draws from the distribution `minimax_m2.sampling.sampling_probs` defines, by inverse CDF over the
candidates in descending order of probability, with one uniform number per row passed in (the host draws
it from the request's own generator, so a seed gives the same tokens whatever the batch). The candidates
are the K most likely tokens (K a trace-time constant): exact for every row whose top_k is at most K;
a row without top_k (0 here) is sampled on the host from its logits instead.
"""

import numpy as np

from kernels.collectives import ReplicaGroups, all_gather

_MASKED = np.float32(np.finfo(np.float32).min)


def top_candidates(logits: np.ndarray, ids: np.ndarray, k: int,
                   partial_sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """logits, ids: [N, C] -> the k largest (values [N, k] descending, their ids [N, k]); ties go to the
    first column. k rounds of argmax (no sort on the device), or with partial_sort (a trace-time schedule,
    this CPU's: nkipy traces no partition) one partial sort of each row, the same candidates in the same
    order wherever a row has k logits above the mask (past them, masked candidates carry no probability)."""
    if partial_sort:
        return _top_by_partition(logits, ids, k)
    columns = np.arange(logits.shape[-1], dtype=np.int32)[None, :]
    values, chosen = [], []
    for _ in range(k):
        best = np.argmax(logits, axis=-1).astype(np.int32)
        values.append(np.take_along_axis(logits, best[:, None], axis=1))
        chosen.append(np.take_along_axis(ids, best[:, None], axis=1))
        logits = np.where(columns == best[:, None], _MASKED, logits)
    return np.concatenate(values, axis=1), np.concatenate(chosen, axis=1)


def _top_by_partition(logits: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`top_candidates` by np.partition (host NumPy, never traced): the columns above each row's k-th largest
    logit, then the first of those equal to it, in descending order of logit, ties by column."""
    kth = -np.partition(-logits, k - 1, axis=-1)[:, k - 1 : k]  # [N, 1]
    above, tied = logits > kth, logits == kth
    room = k - np.sum(above, axis=-1, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=-1) <= room))  # k columns a row, in column order
    kept = np.nonzero(keep)[1].reshape(-1, k)
    order = np.argsort(-np.take_along_axis(logits, kept, axis=1), axis=-1, kind="stable")
    kept = np.take_along_axis(kept, order, axis=1)
    return np.take_along_axis(logits, kept, axis=1), np.take_along_axis(ids, kept, axis=1)


def _triangle(n: int, like: np.ndarray, strict: bool) -> np.ndarray:
    """[n, n] float32 ones on and above (strict: above) the diagonal, as a value of the trace (a NumPy
    constant cannot be a matmul operand in nkipy)."""
    return np.triu(np.ones((n, n), np.float32), 1 if strict else 0) + np.zeros_like(like[:1, :1])


def sample_candidates(values: np.ndarray, ids: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
                      top_p: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """values [N, K] float32 descending with their ids [N, K]; temperature, top_p, uniform [N] float32 (uniform
    in [0, 1)); top_k [N] int32 in 1..K -> [N] int32, a draw from softmax(values / temperature) over the top_k
    candidates, cut to the smallest prefix whose preceding mass is below top_p, renormalised."""
    k = values.shape[-1]
    scaled = values / np.maximum(temperature, np.float32(1e-6))[:, None]
    keep = np.arange(k, dtype=np.int32)[None, :] < top_k[:, None]
    weights = np.where(keep, np.exp(scaled - scaled[:, :1]), np.float32(0))
    probs = weights / np.sum(weights, axis=-1, keepdims=True)
    before = probs @ _triangle(k, probs, strict=True)  # mass of the more likely candidates
    probs = np.where(before < top_p[:, None], probs, np.float32(0))
    cdf = probs @ _triangle(k, probs, strict=False)
    chosen = np.sum((cdf < uniform[:, None] * cdf[:, -1:]).astype(np.int32), axis=-1)
    last = np.sum((probs > 0).astype(np.int32), axis=-1) - 1
    return np.take_along_axis(ids, np.minimum(chosen, last)[:, None], axis=1)[:, 0]


def top_vocab_parallel(logits: np.ndarray, vocab_offset: np.ndarray, k: int, replica_groups: ReplicaGroups | None,
                       partial_sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """This rank's vocabulary slice of the logits ([N, Vr], starting at vocab_offset[0], padding masked) ->
    the k largest logits of the whole vocabulary (values [N, k] descending, ids [N, k] int32), identical on
    every rank: each rank's best gathered, the best of those kept (partial_sort: `top_candidates`)."""
    columns = logits.shape[-1]
    ids = np.broadcast_to(vocab_offset[0] + np.arange(columns, dtype=np.int32)[None, :], logits.shape)
    values, chosen = top_candidates(logits, ids, min(k, columns), partial_sort)
    every_value = all_gather(values, 1, replica_groups)  # [N, W * k]
    every_id = all_gather(chosen, 1, replica_groups)
    return top_candidates(every_value, every_id, k, partial_sort)


def sample_vocab_parallel(logits: np.ndarray, vocab_offset: np.ndarray, greedy: np.ndarray, temperature: np.ndarray,
                          top_k: np.ndarray, top_p: np.ndarray, uniform: np.ndarray, *, candidates: int,
                          replica_groups: ReplicaGroups | None, partial_sort: bool = False) -> np.ndarray:
    """The next token of each row from this rank's vocabulary slice of the logits ([N, Vr], starting at
    vocab_offset[0], padding masked): greedy [N] int32 where temperature is 0, else a draw from the
    `candidates` most likely tokens of the whole vocabulary (each rank's best gathered, the best of those
    kept, `top_vocab_parallel`, partial_sort its schedule). Rows whose top_k is 0 (none) get greedy here: the
    host samples them."""
    values, chosen = top_vocab_parallel(logits, vocab_offset, candidates, replica_groups, partial_sort)
    drawn = sample_candidates(values, chosen, temperature, np.maximum(top_k, 1), top_p, uniform)
    return np.where((temperature > 0) & (top_k > 0), drawn, greedy)
