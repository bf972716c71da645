"""Self-attention of one MiniMax-M2 layer: QK-norm over the full projection, partial RoPE, GQA, KV cache."""

import numpy as np

from kernels.collectives import ReplicaGroups, all_reduce, group_size
from kernels.matmul import matmul
from kernels.rmsnorm import normalize, sum_of_squares
from kernels.rope import rope_partial

_MASKED = np.float32(np.finfo(np.float32).min)


def attention(
    x: np.ndarray,
    positions: np.ndarray,
    wq: np.ndarray,
    wk: np.ndarray,
    wv: np.ndarray,
    wo: np.ndarray,
    q_norm: np.ndarray,
    k_norm: np.ndarray,
    cos_table: np.ndarray,
    sin_table: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    *,
    head_dim: int,
    eps: float,
    kv_len: int,
    replica_groups: ReplicaGroups | None = None,
) -> np.ndarray:
    """Causal GQA attention for S new tokens at `positions`, continuing a fixed-size KV cache.

    x: [B, S, hidden]; positions: [S] int (start_pos + arange(S)); wq: [hidden, Hq*D], wk/wv: [hidden, Hkv*D],
    wo: [Hq*D, hidden]; q_norm: [Hq*D], k_norm: [Hkv*D]; cos/sin_table: [max_seq, R] from `rope_tables`,
    passed in like a weight (a gather at traced positions needs a traced table);
    k_cache/v_cache: [B, Hkv, max_seq, D], written in place at `positions`; kv_len: static number of
    cache slots attended (>= last position + 1). Returns out [B, S, hidden] in x's dtype; scores and
    softmax are float32.

    q and k are RMS-normalised over their whole projection width before the head split. Under tensor
    parallelism (heads split over `replica_groups`) the q and k sums of squares are all-reduced together
    over the group, and so are the output projection's partial sums.
    """
    batch, seq, _ = x.shape
    kv_heads = k_cache.shape[1]
    q_heads = wq.shape[1] // head_dim
    group = q_heads // kv_heads

    q, k = matmul(x, wq), matmul(x, wk)
    ranks = group_size(replica_groups)
    sums = all_reduce(np.concatenate([sum_of_squares(q), sum_of_squares(k)], axis=-1), replica_groups)  # one exchange
    q = normalize(q, q_norm, sums[..., :1], q.shape[-1] * ranks, eps).reshape(batch, seq, q_heads, head_dim)
    k = normalize(k, k_norm, sums[..., 1:], k.shape[-1] * ranks, eps).reshape(batch, seq, kv_heads, head_dim)
    v = matmul(x, wv).reshape(batch, seq, kv_heads, head_dim)

    cos = np.take(cos_table, positions, axis=0)
    sin = np.take(sin_table, positions, axis=0)
    q = rope_partial(q, cos, sin)
    k = rope_partial(k, cos, sin)

    k_cache[:, :, positions] = np.transpose(k, (0, 2, 1, 3))
    v_cache[:, :, positions] = np.transpose(v, (0, 2, 1, 3))
    keys = k_cache[:, :, :kv_len]
    values = v_cache[:, :, :kv_len]

    # Query head h reads KV head h // group: rows of one KV head are its group's queries, group-major.
    q = np.transpose(q.reshape(batch, seq, kv_heads, group, head_dim), (0, 2, 3, 1, 4))
    q = q.reshape(batch, kv_heads, group * seq, head_dim)
    scores = matmul(q, np.swapaxes(keys, -1, -2)).astype(np.float32) * np.float32(head_dim**-0.5)

    visible = np.arange(kv_len)[None, :] <= positions[:, None]
    scores = np.where(np.tile(visible, (group, 1)), scores, _MASKED)
    scores = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    probs = scores / np.sum(scores, axis=-1, keepdims=True)

    out = matmul(probs.astype(values.dtype), values).reshape(batch, kv_heads, group, seq, head_dim)
    out = np.transpose(out, (0, 3, 1, 2, 4)).reshape(batch, seq, q_heads * head_dim)
    return all_reduce(matmul(out, wo), replica_groups)
