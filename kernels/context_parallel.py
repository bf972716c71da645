"""Context parallelism: one sequence's keys and values spread over the attention groups, every group attending
every group's queries against the part it holds, the parts combined by their softmax statistics.

A group's part of a query's attention is (out, best, total): the values weighted by exp((score - best) *
scale), their sum of weights, and the largest score it saw. Groups that saw nothing give best = float32's
lowest, whose weight exp((lowest - best') * scale) is 0 beside any group that saw a key.
"""

import numpy as np

from kernels.collectives import ReplicaGroups, all_gather, all_to_all, group_size


def gather_queries(q: np.ndarray, k: np.ndarray, v: np.ndarray, spread_groups: ReplicaGroups
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every group's new tokens, in group order, on every group (one exchange): q [T, Hq, D], k [T, Hkv, D],
    v [T, Hkv * D], all of one dtype -> the same of [dp * T] tokens."""
    tokens, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    joined = np.concatenate([q.reshape(tokens, -1), k.reshape(tokens, -1), v], axis=-1)
    every = all_gather(joined, 0, spread_groups)
    width = q_heads * head_dim
    return (every[:, :width].reshape(-1, q_heads, head_dim),
            every[:, width : width + kv_heads * head_dim].reshape(-1, kv_heads, head_dim),
            every[:, width + kv_heads * head_dim :])


def combine_parts(out: np.ndarray, best: np.ndarray, total: np.ndarray, spread_groups: ReplicaGroups,
                  scale: np.float32) -> np.ndarray:
    """Each group's parts for every group's rows -> this group's rows' attention.

    out: [dp * R, ..., D], best and total: [dp * R, ..., 1] float32 (rows in group order, this group's keys
    only) -> [R, ..., D] float32: softmax over all groups' keys, sum_g exp((best_g - m) * scale) out_g over
    sum_g exp((best_g - m) * scale) total_g, m the largest best_g. One all_to_all sends each group its rows."""
    groups = group_size(spread_groups)
    head_dim = out.shape[-1]
    parts = all_to_all(np.concatenate([out, best, total], axis=-1), 0, 0, spread_groups)
    parts = parts.reshape(groups, -1, *parts.shape[1:])  # [dp (the group that computed it), R, ..., D + 2]
    best = parts[..., head_dim : head_dim + 1]
    weight = np.exp((best - np.max(best, axis=0, keepdims=True)) * scale)
    norm = np.sum(weight * parts[..., head_dim + 1 :], axis=0)
    return np.sum(weight * parts[..., :head_dim], axis=0) / np.maximum(norm, np.float32(np.finfo(np.float32).tiny))
