"""Self-attention of one MiniMax-M2 layer: QK-norm over the full projection, partial RoPE, GQA, KV cache rows."""

import numpy as np

from kernels.collectives import ReplicaGroups, all_reduce, group_size
from kernels.context_parallel import combine_parts, gather_queries
from kernels.matmul import cast, matmul
from kernels.rmsnorm import normalize, sum_of_squares
from kernels.rope import rope_partial

_MASKED = np.float32(np.finfo(np.float32).min)
HOST_TILE_BYTES = 1 << 19  # keys and values a host attention tile reads at once: they stay in a core's cache
# rows up to which a host projection multiplies a weight held as [out, in] rows as the left operand (measured
# on this CPU, 8 layers' projections of the medium config: 1 row 4.1 against 6.1 ms, 16 rows 8.1 against
# 12.7, 128 rows 39.7 against 43.0; at 512 rows 127 against 119 ms)
LEFT_OPERAND_ROWS = 256


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
    kv_blocks: np.ndarray,
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
    ragged: bool = False,
    host_schedule: bool = False,
    spread: tuple[np.ndarray, ...] | None = None,
    spread_groups: ReplicaGroups | None = None,
) -> np.ndarray:
    """Causal GQA attention for R rows of `seq` new tokens, each row continuing its own sequence in a paged
    KV cache.

    x: [T, hidden] with T = R * seq (row r's tokens at r * seq ..); positions: [T] int32, each token's
    position in its sequence; kv_blocks: where each row's keys and values are: its block table [>= R, W]
    int32, the cache blocks of its positions (`block_index`; the first R rows are used: padded to two when
    R is 1, as no compiled input has a dimension of 1; W * block >= kv_len), or with `ragged` (one token per
    row) the blocks the step attends [N, 3] (`attend_tiles`), so that its reads follow the rows' lengths;
    token_valid: [T] bool, False for padding tokens, which write into
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
    all kv_len at once; not used when ragged); host_schedule (a trace-time constant, this CPU's: never
    traced, its shapes follow the step's values): a ragged step's tiles read where they lie (`attend_tiles`),
    another step's rows attending alone, each its real tokens over its own length (`_attend_rows`), and
    the projections leaving out the padding tokens (their q, k, v and output zero).

    spread (context parallelism, `kernels.context_parallel`): the step's sequences' keys and values lie in
    several attention groups, the ranks holding the same heads of every group forming `spread_groups`. Every
    group's new q, k, v are gathered on every group; spread = (positions [dp * T] int32 of every group's tokens,
    written [dp * T] int32: where this group's cache takes each one's K/V, its scratch block for the ones it does
    not hold) and for a prefill also starts [dp * R, W] int32, the first position of each block of kv_blocks,
    now [dp * R, W]: this group's blocks of each gathered row (FAR: padding); a ragged step's tiles name
    gathered rows. Each group attends every gathered query against its own blocks; the parts are combined
    where the queries came from.
    """
    tokens = x.shape[0]
    rows = tokens // seq
    kv_heads = k_cache.shape[1] // head_dim
    q_heads = wq.shape[1] // head_dim
    group = q_heads // kv_heads
    scratch = np.int32((k_cache.shape[0] // block - 1) * block)  # the scratch block's first position

    live = (slice(None) if token_valid.all() else np.flatnonzero(token_valid)) if host_schedule else None
    q, k = _project(x, wq, rows_apart, live), _project(x, wk, rows_apart, live)
    ranks = group_size(replica_groups)
    sums = all_reduce(np.concatenate([sum_of_squares(q), sum_of_squares(k)], axis=-1), replica_groups)  # one exchange
    q = normalize(q, q_norm, sums[..., :1], q.shape[-1] * ranks, eps).reshape(tokens, q_heads, head_dim)
    k = normalize(k, k_norm, sums[..., 1:], k.shape[-1] * ranks, eps).reshape(tokens, kv_heads, head_dim)
    v = _project(x, wv, rows_apart, live)

    cos = np.take(cos_table, positions, axis=0)  # [T, R']
    sin = np.take(sin_table, positions, axis=0)
    q = rope_partial(q, cos, sin)
    k = rope_partial(k, cos, sin)

    # Query head h reads KV head h // group: rows of one KV head are its group's queries, group-major.
    def by_kv_head(q: np.ndarray) -> np.ndarray:  # [n * S, Hq, D] -> [n, Hkv, G * S, D]
        q = np.transpose(q.reshape(-1, seq, kv_heads, group, head_dim), (0, 2, 3, 1, 4))
        return q.reshape(-1, kv_heads, group * seq, head_dim)

    if spread is not None:
        q, k, v = gather_queries(q, k, v, spread_groups)
        k_cache[spread[1]] = k.reshape(-1, kv_heads * head_dim)
        v_cache[spread[1]] = v
        out = _attend_spread(by_kv_head(q), k_cache, v_cache, kv_blocks, spread, spread_groups, block=block,
                             kv_tile=kv_tile, ragged=ragged, host_schedule=host_schedule)
    else:
        at = positions.reshape(rows, seq)
        offset = block_offset(positions, block)[1]
        if ragged:
            cached = tile_block_start(kv_blocks, positions - offset, block) + offset
        else:
            cached = block_index(kv_blocks[:rows], at, block).reshape(-1)
        written = np.where(token_valid, cached, scratch + offset)
        k_cache[written] = k.reshape(tokens, kv_heads * head_dim)
        v_cache[written] = v
        q = by_kv_head(q)  # [R, Hkv, G * S, D]
        if ragged:
            out = attend_tiles(q, k_cache, v_cache, kv_blocks, positions, block=block, in_place=host_schedule)
        elif host_schedule:
            out = _attend_rows(q, k_cache, v_cache, kv_blocks[:rows], at, token_valid.reshape(rows, seq),
                               block=block, kv_tile=kv_tile or kv_len)
        else:
            out = attend_cache(q, k_cache, v_cache, table_index(kv_blocks[:rows], block), at, kv_len=kv_len,
                               kv_tile=kv_tile or kv_len)
    out = cast(out, x.dtype).reshape(rows, kv_heads, group, seq, head_dim)
    out = np.transpose(out, (0, 3, 1, 2, 4)).reshape(tokens, q_heads * head_dim)
    partial = _project(out, wo, rows_apart, live)
    return all_reduce(partial, replica_groups) if reduce_output else partial


def _project(a: np.ndarray, w: np.ndarray, rows_apart: bool, live: np.ndarray | slice | None) -> np.ndarray:
    """a [T, in] @ w [in, out]. With live (the host schedule's real tokens, value-dependent: never traced) only
    those rows are multiplied, the others zero, and a weight held as the rows of its transpose (the
    checkpoint's [out, in], as this CPU loads it) is the left operand for up to LEFT_OPERAND_ROWS rows,
    (w^T a^T)^T, which this CPU's BLAS multiplies faster (`_linear` in `minimax_m2.weights.model_weights`)."""
    if live is None:
        return matmul(a, w, rows_apart)
    rows = a if isinstance(live, slice) else a[live]
    left = w.T.flags.c_contiguous and rows.shape[0] <= LEFT_OPERAND_ROWS
    product = matmul(w.T, rows.T).T if left else matmul(rows, w, rows_apart)
    if isinstance(live, slice):
        return product
    out = np.zeros((a.shape[0], w.shape[1]), product.dtype)
    out[live] = product
    return out


def _attend_spread(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, kv_blocks: np.ndarray,
                   spread: tuple[np.ndarray, ...], spread_groups: ReplicaGroups, *, block: int, kv_tile: int | None,
                   ragged: bool, host_schedule: bool) -> np.ndarray:
    """Every group's gathered queries q [dp * R, Hkv, G * S, D] against this group's blocks (a ragged step's
    tiles, or a prefill's tables with their first positions, spread[2]), the parts combined per row
    (`kernels.context_parallel.combine_parts`) -> this group's rows [R, Hkv, G * S, D] float32."""
    rows, positions = q.shape[0], spread[0]
    if ragged:
        parts = tile_parts(q, k_cache, v_cache, kv_blocks, positions, block=block, in_place=host_schedule)
    else:
        keys = (spread[2][:, :, None] + np.arange(block, dtype=np.int32)[None, None, :]).reshape(rows, -1)
        parts = cache_parts(q, k_cache, v_cache, table_index(kv_blocks, block), positions.reshape(rows, -1),
                            kv_len=keys.shape[1], kv_tile=kv_tile or keys.shape[1], key_positions=keys)
    return combine_parts(*parts, spread_groups, np.float32(q.shape[-1] ** -0.5))


def attend_cache(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, cached: np.ndarray, positions: np.ndarray,
                 *, kv_len: int, kv_tile: int) -> np.ndarray:
    """softmax(q k^T / sqrt(D), causal) v over the first kv_len positions of each row's cache row, in tiles of
    kv_tile positions with a running maximum and sum (the online softmax, `cache_parts`), so that the float32
    scores held at once are [R, Hkv, G * S, kv_tile], whatever kv_len is.

    q: [R, Hkv, G * S, D] (row r's queries, group-major: query g * S + s is token s of head g); k/v_cache:
    [cache positions, Hkv * D]; cached: [R, >= kv_len] int32, where each row's positions 0, 1, .. are in the
    cache (`table_index`); positions: [R, S] int32, each query's position (it sees cache positions <= it).
    kv_tile divides kv_len. Returns [R, Hkv, G * S, D] float32.
    """
    out, _, total = cache_parts(q, k_cache, v_cache, cached, positions, kv_len=kv_len, kv_tile=kv_tile)
    return out / total


def cache_parts(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, cached: np.ndarray, positions: np.ndarray,
                *, kv_len: int, kv_tile: int, key_positions: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`attend_cache`'s online softmax, left unnormalised: (the weighted values [R, Hkv, G * S, D], the largest
    score [.., 1] and the sum of weights [.., 1], float32), weights exp((score - largest) * scale).

    key_positions: [R, >= kv_len] int32, the position of each cache entry read (default 0, 1, ..: a row's
    whole sequence; else some of its blocks, e.g. the ones one attention group holds, padding at a position no
    query sees). Each tile's weights are normalised after the PV product; with one tile this is plain softmax.
    Masked scores are float32's lowest value, so a tile a query cannot see adds exp(lowest - max) = 0 to it
    once a tile it sees has come."""
    rows, kv_heads, queries, head_dim = q.shape
    group = queries // positions.shape[1]
    scale = np.float32(head_dim**-0.5)
    seen = np.tile(positions, (1, group))[:, None, :, None]  # [R, 1, G * S, 1]: each query's position
    best = total = out = None
    for start in range(0, kv_len, kv_tile):
        if key_positions is None:
            span = np.arange(start, start + kv_tile, dtype=np.int32)[None, None, None, :]
        else:
            span = key_positions[:, None, None, start : start + kv_tile]
        keys, values = read_kv(k_cache, v_cache, cached[:, start : start + kv_tile], kv_heads)
        scores = cast(matmul(q, np.swapaxes(keys, -1, -2)), np.float32)  # [R, Hkv, G * S, tile]
        scores = np.where(span <= seen, scores, _MASKED)
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
        del keys, values, scores, weights, part  # this tile's arrays go before the next tile's are made
    return out, best, total


def _attend_rows(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, tables: np.ndarray, positions: np.ndarray,
                 valid: np.ndarray, *, block: int, kv_tile: int) -> np.ndarray:
    """The causal attention of a step's rows as host NumPy (never traced): each row's real tokens (a prefix of
    its S: valid [R, S] bool), `block` of them at a time, each span over the positions up to its last only
    (a prompt's masked half of the scores is never computed), in tiles of at most kv_tile positions (so its
    scores stay within the step's) and HOST_TILE_BYTES of keys and values, with the online softmax of
    `cache_parts`. tables: [R, W] int32 block tables (key i of a row is its position i); positions: [R, S]
    int32, ascending over a row's real tokens. Padding rows and tokens give zeros. Returns [R, Hkv, G * S, D]
    float32."""
    rows, kv_heads, queries, head_dim = q.shape
    seq = positions.shape[1]
    group = queries // seq
    out = np.zeros((rows, kv_heads, group, seq, head_dim), np.float32)
    tile = max(block, min(kv_tile, HOST_TILE_BYTES // (2 * k_cache.shape[1] * k_cache.itemsize)) // block * block)
    for r, n in enumerate(np.sum(valid, axis=1).tolist()):
        mine = q[r].reshape(out.shape[1:])
        for first in range(0, n, block):
            span = slice(first, min(first + block, n))
            width = span.stop - span.start
            part = _attend_span(mine[:, :, span].reshape(kv_heads, group * width, head_dim), k_cache, v_cache,
                                tables[r], np.tile(positions[r, span], group), block=block, kv_tile=tile)
            out[r, :, :, span] = part.reshape(kv_heads, group, width, head_dim)
    return out.reshape(q.shape)


def _attend_span(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, table: np.ndarray, at: np.ndarray, *,
                 block: int, kv_tile: int) -> np.ndarray:
    """Queries q [Hkv, m, D] of one row, each at position at [m], over that row's keys and values at positions
    0 .. max(at) (its block table [W]), kv_tile of them at a time -> [Hkv, m, D] float32 (host only; each KV
    head's keys multiplied once by all its queries)."""
    kv_heads, head_dim = q.shape[0], q.shape[-1]
    scale = np.float32(head_dim**-0.5)
    end = int(np.max(at)) + 1
    best = total = acc = None
    for start in range(0, end, kv_tile):
        blocks = table[start // block : -(-min(start + kv_tile, end) // block)]
        read = (blocks[:, None] * np.int32(block) + np.arange(block, dtype=np.int32)[None, :]).reshape(-1)
        keys = k_cache[read].reshape(-1, kv_heads, head_dim)  # [t, Hkv, D]
        values = np.transpose(v_cache[read].reshape(-1, kv_heads, head_dim), (1, 0, 2))  # [Hkv, t, D]
        scores = cast(matmul(q, np.transpose(keys, (1, 2, 0))), np.float32)  # [Hkv, m, t]
        scores *= scale
        if start + read.size - 1 > np.min(at):  # some key lies after some query
            scores += np.where(start + np.arange(read.size)[None, :] > at[:, None], np.float32(-np.inf), np.float32(0))
        tile_best = np.max(scores, axis=-1, keepdims=True)
        if best is not None:
            tile_best = np.maximum(best, tile_best)
            carried = np.exp(best - tile_best)
            total *= carried
            acc *= carried
        best = tile_best
        np.subtract(scores, best, out=scores)
        np.exp(scores, out=scores)
        part = cast(matmul(cast(scores, values.dtype), values), np.float32)
        if total is None:
            total, acc = np.sum(scores, axis=-1, keepdims=True), part
        else:
            total += np.sum(scores, axis=-1, keepdims=True)
            acc += part
    return acc / total


def read_kv(k_cache: np.ndarray, v_cache: np.ndarray, read: np.ndarray, kv_heads: int) -> tuple[np.ndarray, ...]:
    """Keys and values at flat cache positions read [n, m] -> each [n, Hkv, m, D]."""
    n, m = read.shape
    head_dim = k_cache.shape[1] // kv_heads
    return tuple(np.transpose(cache[read].reshape(n, m, kv_heads, head_dim), (0, 2, 1, 3))
                 for cache in (k_cache, v_cache))


def tile_block_start(tiles: np.ndarray, starts: np.ndarray, block: int) -> np.ndarray:
    """The first cache position of the block holding each row's position, found among the step's tiles:
    tiles [N, 3] int32 (`attend_tiles`), starts [R] int32 (the first position of the block holding each row's
    one token) -> [R] int32 (0 for a row with no tile: a padding row, which writes the scratch block anyway).
    A sum of products over the tiles that match (row, block start): exact in int32."""
    match = (tiles[None, :, 0] == np.arange(starts.shape[0], dtype=np.int32)[:, None]) & \
        (tiles[None, :, 2] == starts[:, None])  # [R, N]
    return np.sum(match.astype(np.int32) * tiles[None, :, 1], axis=1) * np.int32(block)


def attend_tiles(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, tiles: np.ndarray, positions: np.ndarray,
                 *, block: int, in_place: bool = False) -> np.ndarray:
    """softmax(q k^T / sqrt(D), causal) v for one query token per row, over the cache blocks the step lists:
    its keys and values read, and its FLOPs, follow the sum of the rows' lengths, not rows x the longest.

    q: [R, Hkv, G, D]; tiles: [N, 3] int32, one per block attended: (its row, its cache block, the position
    of its first entry); every row's blocks up to its position, in any order; padding tiles name the
    scratch block at a first position past every row's, so they see nothing. positions: [R] int32 (a row
    sees positions <= its own). A row with no tile (padding) gives zeros. Returns [R, Hkv, G, D] float32.
    in_place (a trace-time schedule, this CPU's, never traced): the tiles read where they lie in the cache
    (`_runs_in_place`) rather than gathered into one copy first, which on a CPU costs more than the
    products."""
    out, _, norm = tile_parts(q, k_cache, v_cache, tiles, positions, block=block, in_place=in_place)
    return out / np.maximum(norm, np.float32(np.finfo(np.float32).tiny))


def tile_parts(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, tiles: np.ndarray, positions: np.ndarray,
               *, block: int, in_place: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`attend_tiles` left unnormalised: (each row's weighted values [R, Hkv, G, D], its largest score [.., 1],
    its sum of weights [.., 1], float32; a row with no tile: zeros and float32's lowest). Each tile's softmax
    is taken alone (its maximum, its sum, its weighted values), then a row's tiles are combined, scaled to
    the row's largest maximum: the online softmax, all tiles at once."""
    rows, kv_heads, group, head_dim = q.shape
    scale = np.float32(head_dim**-0.5)
    if in_place:
        row, best, total, part = _runs_in_place(q, k_cache, v_cache, tiles, positions, block, scale)
    else:
        row, first = tiles[:, 0], tiles[:, 2]
        within = np.arange(block, dtype=np.int32)
        keys, values = read_kv(k_cache, v_cache, tiles[:, 1:2] * np.int32(block) + within[None, :], kv_heads)
        visible = first[:, None] + within[None, :] <= np.take(positions, row)[:, None]  # [N, B]
        best, total, part = _tile_softmax(np.take(q, row, axis=0), np.swapaxes(keys, -1, -2), values,
                                          visible[:, None, None, :], scale)  # each [N, Hkv, G, .]
    count = row.shape[0]
    member = row[None, :] == np.arange(rows, dtype=np.int32)[:, None]  # [R, N]
    row_best = np.max(np.where(member[:, :, None, None, None], best[None], _MASKED), axis=1)  # [R, Hkv, G, 1]
    carried = np.exp((best - np.take(row_best, row, axis=0)) * scale)  # [N, Hkv, G, 1]
    share = member.astype(np.float32)
    out = matmul(share, (part * carried).reshape(count, -1)).reshape(rows, kv_heads, group, head_dim)
    norm = matmul(share, (total * carried).reshape(count, -1)).reshape(rows, kv_heads, group, 1)
    return out, row_best, norm


def _runs_in_place(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, tiles: np.ndarray, positions: np.ndarray,
                   block: int, scale: np.float32) -> tuple[np.ndarray, ...]:
    """`attend_tiles`' per-tile softmax parts as host NumPy (never traced): each run of tiles of one row whose
    blocks follow one another in the cache (as a prompt's blocks mostly do) is one slab of the cache, its
    keys and values multiplied where they lie (a view, no gathered copy) -> (the runs' rows [M] int32, their
    maxima [M, Hkv, G, 1], sums [M, Hkv, G, 1] and weighted values [M, Hkv, G, D], float32)."""
    kv_heads, head_dim = q.shape[1], q.shape[3]
    runs: list[list[int]] = []  # [row, first block, first position, blocks]
    for row, b, first in tiles.tolist():
        last = runs[-1] if runs else None
        if last and last[0] == row and last[1] + last[3] == b and last[2] + last[3] * block == first:
            last[3] += 1
        else:
            runs.append([row, b, first, 1])
    keys, values = (cache.reshape(-1, kv_heads, head_dim) for cache in (k_cache, v_cache))  # views
    parts = []
    for row, b, first, n in runs:
        span = slice(b * block, (b + n) * block)
        visible = first + np.arange(n * block, dtype=np.int32) <= positions[row]  # [n * block]
        parts.append(_tile_softmax(q[row], np.transpose(keys[span], (1, 2, 0)),
                                   np.transpose(values[span], (1, 0, 2)), visible, scale))  # each [Hkv, G, .]
    return (np.array([r[0] for r in runs], np.int32),) + tuple(np.stack(p) for p in zip(*parts))


def _tile_softmax(q: np.ndarray, keys_t: np.ndarray, values: np.ndarray, visible: np.ndarray,
                  scale: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One tile's softmax taken alone: q [..., G, D] against keys_t [..., D, B] where `visible` (broadcast to
    the scores [..., G, B]), values [..., B, D] -> (its maximum [..., G, 1], its sum of exp [..., G, 1], its
    weighted values [..., G, D]), float32."""
    scores = np.where(visible, cast(matmul(q, keys_t), np.float32), _MASKED)
    best = np.max(scores, axis=-1, keepdims=True)
    weights = np.exp((scores - best) * scale)
    return best, np.sum(weights, axis=-1, keepdims=True), cast(matmul(cast(weights, values.dtype), values), np.float32)
