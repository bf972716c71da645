"""RMSNorm with float32 statistics, optionally over a width split across ranks."""

import numpy as np

from kernels.collectives import ReplicaGroups, all_reduce, group_size


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, replica_groups: ReplicaGroups | None = None) -> np.ndarray:
    """y = weight * (x / sqrt(mean(x^2) + eps)) over the last axis, statistics in float32.

    x: [..., n] (this rank's slice of the full width), weight: [n] -> [..., n] in x's dtype (the
    normalised x is cast back before the weight multiplies it, as transformers does).
    When the width is split over the ranks of `replica_groups`, the sum of squares is all-reduced
    so the mean is over the full width n * group_size, exactly as on one rank.
    """
    x32 = x.astype(np.float32)
    sum_sq = all_reduce(np.sum(np.square(x32), axis=-1, keepdims=True), replica_groups)
    mean_sq = sum_sq / np.float32(x.shape[-1] * group_size(replica_groups))
    return weight * (x32 / np.sqrt(mean_sq + np.float32(eps))).astype(x.dtype)
