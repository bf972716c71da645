"""Self-attention of one MiniMax-M2 layer: QK-norm over the full projection, partial RoPE, GQA, KV cache rows."""

import numpy as np

from kernels.collectives import ReplicaGroups, all_reduce, group_size
from kernels.matmul import cast, matmul
from kernels.rmsnorm import normalize, sum_of_squares
from kernels.rope import rope_partial

_MASKED = np.float32(np.finfo(np.float32).min)


def block_offset(positions: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(p // block, p % block) of int32 positions, the quotient found in float32 (exact below 2^24), as integer
    division does not trace."""
    which = np.floor(positions.astype(np.float32) / np.float32(block)).astype(np.int32)
    return which, positions - which * np.int32(block)


def block_index(tables: np.ndarray, positions: np.ndarray, block: int) -> np.ndarray:
    """Flat KV-cache index of each row's positions through its block table: tables [R, W] int32 (row r's
    positions p .. p + block - 1 live in cache block tables[r, p // block]), positions [R, S] int32 ->
    [R, S] int32, tables[r, p // block] * block + p % block."""
    which, offset = block_offset(positions, block)
    return np.take_along_axis(tables, which, axis=1) * np.int32(block) + offset


def table_index(tables: np.ndarray, block: int) -> np.ndarray:
    """Every position of each row's blocks, in order: tables [R, W] int32 -> [R, W * block] flat cache indices."""
    rows, width = tables.shape
    return (tables[:, :, None] * np.int32(block) + np.arange(block, dtype=np.int32)[None, None, :]).reshape(
        rows, width * block)


def attention(
    x: np.ndarray,
    positions: np.ndarray,
    block_tables: np.ndarray,
    token_valid: np.ndarray,
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
    block: int,
    kv_len: int,
    seq: int,
    replica_groups: ReplicaGroups | None = None,
    reduce_output: bool = True,
    rows_apart: bool = False,
    kv_tile: int | None = None,
) -> np.ndarray:
    """Causal GQA attention for R rows of `seq` new tokens, each row continuing its own sequence in a paged
    KV cache.

    x: [T, hidden] with T = R * seq (row r's tokens at r * seq ..); positions: [T] int32, each token's
    position in its sequence; block_tables: [>= R, W] int32, the cache blocks of each row's positions
    (`block_index`; the first R rows are used: padded to two when R is 1, as no compiled input has a
    dimension of 1; W * block >= kv_len); token_valid: [T] bool, False for padding tokens, which write into
    the last cache block (scratch, never read) and never disturb a real row. wq: [hidden, Hq*D], wk/wv:
    [hidden, Hkv*D], wo: [Hq*D, hidden]; q_norm: [Hq*D], k_norm: [Hkv*D]; cos/sin_table: [max_seq, R'] from
    `rope_tables`, passed in like a weight; k_cache/v_cache: [blocks * block, Hkv*D] (block b holds
    positions b * block ..), written in place; kv_len: static number of positions attended (> every row's
    last position). Returns out [T, hidden] in x's dtype; scores and softmax are float32.

    q and k are RMS-normalised over their whole projection width before the head split. Under tensor
    parallelism (heads split over `replica_groups`) the q and k sums of squares are all-reduced together
    over the group, and so are the output projection's partial sums (unless reduce_output is False: the
    caller then sums this rank's partial itself, as part of a wider exchange). rows_apart: the projections'
    schedule (`kernels.matmul.matmul`); kv_tile: cache positions attended per tile (`attend_cache`; default
    all kv_len at once).
    """
    tokens = x.shape[0]
    rows = tokens // seq
    kv_heads = k_cache.shape[1] // head_dim
    q_heads = wq.shape[1] // head_dim
    group = q_heads // kv_heads
    scratch = np.int32((k_cache.shape[0] // block - 1) * block)  # the scratch block's first position
    tables = block_tables[:rows]

    q, k = matmul(x, wq, rows_apart), matmul(x, wk, rows_apart)
    ranks = group_size(replica_groups)
    sums = all_reduce(np.concatenate([sum_of_squares(q), sum_of_squares(k)], axis=-1), replica_groups)  # one exchange
    q = normalize(q, q_norm, sums[..., :1], q.shape[-1] * ranks, eps).reshape(tokens, q_heads, head_dim)
    k = normalize(k, k_norm, sums[..., 1:], k.shape[-1] * ranks, eps).reshape(tokens, kv_heads, head_dim)
    v = matmul(x, wv, rows_apart)

    cos = np.take(cos_table, positions, axis=0)  # [T, R']
    sin = np.take(sin_table, positions, axis=0)
    q = rope_partial(q, cos, sin)
    k = rope_partial(k, cos, sin)

    at = positions.reshape(rows, seq)
    written = np.where(token_valid, block_index(tables, at, block).reshape(-1),
                       scratch + block_offset(at, block)[1].reshape(-1))
    k_cache[written] = k.reshape(tokens, kv_heads * head_dim)
    v_cache[written] = v

    # Query head h reads KV head h // group: rows of one KV head are its group's queries, group-major.
    q = np.transpose(q.reshape(rows, seq, kv_heads, group, head_dim), (0, 2, 3, 1, 4))
    q = q.reshape(rows, kv_heads, group * seq, head_dim)  # [R, Hkv, G * S, D]
    out = attend_cache(q, k_cache, v_cache, table_index(tables, block), at, kv_len=kv_len, kv_tile=kv_tile or kv_len)
    out = cast(out, x.dtype).reshape(rows, kv_heads, group, seq, head_dim)
    out = np.transpose(out, (0, 3, 1, 2, 4)).reshape(tokens, q_heads * head_dim)
    partial = matmul(out, wo, rows_apart)
    return all_reduce(partial, replica_groups) if reduce_output else partial


def attend_cache(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, cached: np.ndarray, positions: np.ndarray,
                 *, kv_len: int, kv_tile: int) -> np.ndarray:
    """softmax(q k^T / sqrt(D), causal) v over the first kv_len positions of each row's cache row, in tiles of
    kv_tile positions with a running maximum and sum (the online softmax), so that the float32 scores held
    at once are [R, Hkv, G * S, kv_tile], whatever kv_len is.

    q: [R, Hkv, G * S, D] (row r's queries, group-major: query g * S + s is token s of head g); k/v_cache:
    [cache positions, Hkv * D]; cached: [R, >= kv_len] int32, where each row's positions 0, 1, .. are in the
    cache (`table_index`); positions: [R, S] int32, each query's position (it sees cache positions <= it).
    kv_tile divides kv_len. Returns [R, Hkv, G * S, D] float32.

    Each tile's weights are normalised after the PV product; with one tile this is plain softmax. Masked
    scores are float32's lowest value, so a tile a query cannot see adds exp(lowest - max) = 0 to it.
    """
    rows, kv_heads, queries, head_dim = q.shape
    group = queries // positions.shape[1]
    scale = np.float32(head_dim**-0.5)
    seen = np.tile(positions, (1, group))[:, None, :, None]  # [R, 1, G * S, 1]: each query's position
    best = total = out = None
    for start in range(0, kv_len, kv_tile):
        span = np.arange(start, start + kv_tile, dtype=np.int32)
        read = cached[:, start : start + kv_tile]  # [R, tile]
        keys = np.transpose(k_cache[read].reshape(rows, kv_tile, kv_heads, head_dim), (0, 2, 1, 3))
        values = np.transpose(v_cache[read].reshape(rows, kv_tile, kv_heads, head_dim), (0, 2, 1, 3))
        scores = cast(matmul(q, np.swapaxes(keys, -1, -2)), np.float32)  # [R, Hkv, G * S, tile]
        scores = np.where(span[None, None, None, :] <= seen, scores, _MASKED)
        tile_best = np.max(scores, axis=-1, keepdims=True)
        new_best = tile_best if best is None else np.maximum(best, tile_best)
        weights = np.exp((scores - new_best) * scale)
        part = cast(matmul(cast(weights, values.dtype), values), np.float32)
        if best is None:
            total, out = np.sum(weights, axis=-1, keepdims=True), part
        else:
            carried = np.exp((best - new_best) * scale)
            total = total * carried + np.sum(weights, axis=-1, keepdims=True)
            out = out * carried + part
        best = new_best
    return out / total
