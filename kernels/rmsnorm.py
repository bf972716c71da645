"""RMSNorm with float32 statistics, optionally over a width split across ranks."""

import numpy as np

from kernels.collectives import ReplicaGroups, all_reduce, group_size


def sum_of_squares(x: np.ndarray) -> np.ndarray:
    """x: [..., n] -> [..., 1] float32 sum of x^2 over the last axis."""
    return np.sum(np.square(x.astype(np.float32)), axis=-1, keepdims=True)


def normalize(x: np.ndarray, weight: np.ndarray, sum_sq: np.ndarray, width: int, eps: float) -> np.ndarray:
    """weight * (x / sqrt(sum_sq / width + eps)) in x's dtype (the normalised x is cast back before the
    weight multiplies it, as transformers does); sum_sq: [..., 1] float32 over the full `width`."""
    x32 = x.astype(np.float32)
    return weight * (x32 / np.sqrt(sum_sq / np.float32(width) + np.float32(eps))).astype(x.dtype)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, replica_groups: ReplicaGroups | None = None) -> np.ndarray:
    """y = weight * (x / sqrt(mean(x^2) + eps)) over the last axis, statistics in float32.

    x: [..., n] (this rank's slice of the full width), weight: [n] -> [..., n] in x's dtype.
    When the width is split over the ranks of `replica_groups`, the sum of squares is all-reduced
    so the mean is over the full width n * group_size, exactly as on one rank.
    """
    sum_sq = all_reduce(sum_of_squares(x), replica_groups)
    return normalize(x, weight, sum_sq, x.shape[-1] * group_size(replica_groups), eps)
