"""Each kernel against a straightforward NumPy reference (loops, explicit formulas).

Plain functions: pytest collects them, and `run_example.py --mode test` runs them one by one.
"""

import importlib

import numpy as np
from ml_dtypes import bfloat16

from kernels import (
    DENSE,
    DYNAMIC,
    attention,
    gather_vocab,
    greedy_pick,
    greedy_vocab_parallel,
    grouped_experts,
    lm_head,
    logprobs_vocab_parallel,
    moe_block,
    moe_block_parallel,
    moe_expert,
    moe_router,
    rmsnorm,
    rope_partial,
    rope_tables,
    sample_candidates,
    token_embedding,
    top_candidates,
    vocab_slice_logits,
    worst_case_capacity,
)
from kernels.attention import _attend_rows, attend_cache, attend_tiles, block_index, table_index, tile_block_start
from kernels.matmul import matmul
from kernels.slots import exclusive_cumsum, place_rows
from minimax_m2.sampling import draw, sampling_probs

RNG_SEED = 1234


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-5) -> None:
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def _ref_rmsnorm(v: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    v = v.astype(np.float64)
    return w * v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)


def _ref_rope(v: np.ndarray, pos: int, rotary_dim: int, theta: float) -> np.ndarray:
    """Rotate pairs (i, i + R/2) of one head vector by pos * theta^(-2i/R), as complex numbers."""
    half = rotary_dim // 2
    out = v.astype(np.float64).copy()
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / rotary_dim)
        z = complex(v[i], v[i + half]) * complex(np.cos(angle), np.sin(angle))
        out[i], out[i + half] = z.real, z.imag
    return out


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def test_rmsnorm() -> None:
    rng = _rng()
    x, w = _randn(rng, 3, 5, 48, scale=3.0), _randn(rng, 48)
    _close(rmsnorm(x, w, 1e-6), _ref_rmsnorm(x, w, 1e-6))


def test_rope_partial() -> None:
    rng = _rng()
    seq, heads, head_dim, rotary_dim, theta = 6, 3, 16, 8, 5e6
    cos, sin = rope_tables(32, rotary_dim, theta)
    positions = np.arange(20, 20 + seq)
    x = _randn(rng, 2, seq, heads, head_dim)
    got = rope_partial(x, np.stack([cos[positions]] * 2), np.stack([sin[positions]] * 2))
    want = np.empty_like(got)
    for b in range(2):
        for s in range(seq):
            for h in range(heads):
                want[b, s, h] = _ref_rope(x[b, s, h], positions[s], rotary_dim, theta)
    _close(got, want)
    assert np.array_equal(got[..., rotary_dim:], x[..., rotary_dim:]), "features past rotary_dim must pass through"


def _ref_attention(x, positions, wq, wk, wv, wo, qn, kn, past_k, past_v, heads, kv_heads, head_dim, rotary_dim, theta,
                   eps):
    """Per-token, per-head loops; past_k/past_v: [B, Hkv, P, D] for the positions before positions[0]."""
    batch, seq, _ = x.shape
    q = _ref_rmsnorm(x @ wq, qn, eps).reshape(batch, seq, heads, head_dim)
    k = _ref_rmsnorm(x @ wk, kn, eps).reshape(batch, seq, kv_heads, head_dim)
    v = (x @ wv).reshape(batch, seq, kv_heads, head_dim)
    for b in range(batch):
        for s in range(seq):
            for h in range(heads):
                q[b, s, h] = _ref_rope(q[b, s, h], positions[s], rotary_dim, theta)
            for h in range(kv_heads):
                k[b, s, h] = _ref_rope(k[b, s, h], positions[s], rotary_dim, theta)
    keys = np.concatenate([past_k, k.transpose(0, 2, 1, 3)], axis=2)
    values = np.concatenate([past_v, v.transpose(0, 2, 1, 3)], axis=2)
    out = np.zeros((batch, seq, heads * head_dim))
    for b in range(batch):
        for s in range(seq):
            visible = positions[s] + 1
            for h in range(heads):
                kvh = h // (heads // kv_heads)
                scores = keys[b, kvh, :visible] @ q[b, s, h] / np.sqrt(head_dim)
                p = np.exp(scores - scores.max())
                out[b, s, h * head_dim : (h + 1) * head_dim] = (p / p.sum()) @ values[b, kvh, :visible]
    return out @ wo, keys, values


def test_attention() -> None:
    """Rows at different lengths, each in its own scattered cache blocks: one row's prefill, then steps that
    mix the other row's prefill with decodes, against per-head loops with the full-width QK norm; padding
    tokens write only the scratch block. The keys are attended all at once and in tiles of 8 and 4
    positions (the online softmax), as a compiled program does and as this CPU does (each row's real tokens
    over its own length, the padding tokens left out of the projections: the host schedule, also with the
    weights held as the checkpoint's [out, in] rows, as this CPU loads them)."""
    for kv_tile in (None, 8, 4):
        for host_schedule, order in ((False, "C"), (True, "C"), (True, "F")):
            _attention_steps(kv_tile, host_schedule, order)


def _attention_steps(kv_tile: int | None, host_schedule: bool, order: str) -> None:
    rng = _rng()
    hidden, heads, kv_heads, head_dim, rotary_dim, theta, eps, max_seq = 32, 4, 2, 16, 8, 1e4, 1e-6, 16
    wq = _randn(rng, hidden, heads * head_dim, scale=0.3)
    wk, wv = (_randn(rng, hidden, kv_heads * head_dim, scale=0.3) for _ in range(2))
    wo = _randn(rng, heads * head_dim, hidden, scale=0.3)
    wq, wk, wv, wo = (np.asarray(w, order=order) for w in (wq, wk, wv, wo))
    qn, kn = 1 + _randn(rng, heads * head_dim, scale=0.3), 1 + _randn(rng, kv_heads * head_dim, scale=0.3)
    cos, sin = rope_tables(max_seq, rotary_dim, theta)
    block = 4
    tables = {0: np.array([5, 2, 7, 0], np.int32), 1: np.array([1, 6, 3, 4], np.int32)}  # block 8: scratch
    k_cache = np.zeros((9 * block, kv_heads * head_dim), np.float32)
    v_cache = np.zeros_like(k_cache)
    past = {slot: (np.zeros((1, kv_heads, 0, head_dim)), np.zeros((1, kv_heads, 0, head_dim))) for slot in (0, 1)}
    lengths = {0: 0, 1: 0}
    # (rows as (slot, new tokens), tokens per row): row 1 starts late, and padding fills the short rows
    for plan, seq in (([(0, 5)], 5), ([(1, 3), (0, 1)], 3), ([(0, 1), (1, 1)], 1), ([(1, 2), (0, 1)], 2)):
        block_tables = np.stack([tables[slot] for slot, _ in plan] + [np.full(4, 8, np.int32)] * (2 - len(plan)))
        valid = np.array([[s < n for s in range(seq)] for _, n in plan])
        positions = np.array([[min(lengths[slot] + s, max_seq - 1) for s in range(seq)] for slot, _ in plan], np.int32)
        x = _randn(rng, len(plan), seq, hidden)
        multiplied = []
        attention_module = importlib.import_module("kernels.attention")  # the module (kernels.attention: the function)
        projections = [id(w) for w in (wq, wk, wv, wo)]
        def counted(a: np.ndarray, b: np.ndarray, apart: bool = False) -> np.ndarray:
            if id(b) in projections:
                multiplied.append(a.shape[0])
            elif a.base is not None and id(a.base) in projections:  # the weight as the left operand, (w^T x^T)^T
                multiplied.append(b.shape[1])
            return matmul(a, b, apart)

        attention_module.matmul = counted
        try:
            got = attention(x.reshape(-1, hidden), positions.reshape(-1), block_tables, valid.reshape(-1), wq, wk, wv,
                            wo, qn, kn, cos, sin, k_cache, v_cache, head_dim=head_dim, eps=eps, block=block,
                            kv_len=max_seq, seq=seq, kv_tile=kv_tile, host_schedule=host_schedule)
        finally:
            attention_module.matmul = matmul
        got = got.reshape(len(plan), seq, hidden)
        assert multiplied == [valid.sum() if host_schedule else valid.size] * 4, "rows of the q, k, v, o projections"
        for r, (slot, n) in enumerate(plan):
            want, *past[slot] = _ref_attention(x[r : r + 1, :n], positions[r, :n], wq, wk, wv, wo, qn, kn, *past[slot],
                                               heads, kv_heads, head_dim, rotary_dim, theta, eps)
            _close(got[r : r + 1, :n], want)
            lengths[slot] += n
    written = []
    for slot in (0, 1):
        at = block_index(tables[slot][None], np.arange(lengths[slot], dtype=np.int32)[None], block)[0]
        _close(k_cache[at].reshape(-1, kv_heads, head_dim).transpose(1, 0, 2)[None], past[slot][0])
        written += at.tolist()
    untouched = np.setdiff1d(np.arange(8 * block), written)
    assert untouched.size and not k_cache[untouched].any(), "padding wrote outside the scratch block"


def test_attention_decode_over_tiles() -> None:
    """One query per row over the blocks the step lists (in any order, padding tiles seeing nothing): the
    softmax over each row's own positions, as over its block table; a padding row gives zeros; each row's
    write position is found among its tiles. The same whether the tiles are gathered (a NeuronCore's
    program) or read in place (this CPU's), in runs of consecutive blocks (row 2's, in order) or not."""
    rng = _rng()
    block, heads, group, head_dim = 4, 2, 3, 8
    k_cache, v_cache = (_randn(rng, 13 * block, heads * head_dim) for _ in range(2))  # block 12: scratch
    tables = np.array([[5, 2, 7, 0], [1, 6, 3, 4], [8, 9, 10, 11]], np.int32)
    positions = np.array([13, 3, 9], np.int32)
    q = _randn(rng, 3, heads, group, head_dim)
    want = attend_cache(q, k_cache, v_cache, table_index(tables, block), positions[:, None], kv_len=16, kv_tile=16)
    listed = [(r, tables[r, j], j * block) for r in range(3) for j in range(positions[r] // block + 1)]
    padded = np.concatenate([q, q[:1]])
    for order in (rng.permutation(len(listed)), np.arange(len(listed))):
        tiles = np.array([listed[i] for i in order] + [(0, 12, 1 << 30)] * 3, np.int32)
        for in_place in (False, True):
            _close(attend_tiles(q, k_cache, v_cache, tiles, positions, block=block, in_place=in_place), want)
            assert not attend_tiles(padded, k_cache, v_cache, tiles, np.r_[positions, 0].astype(np.int32),
                                    block=block, in_place=in_place)[3].any()
    starts = tile_block_start(tiles, positions - positions % block, block)
    np.testing.assert_array_equal(starts, [tables[r, positions[r] // block] * block for r in range(3)])


def test_the_hosts_causal_attention_equals_the_compiled_one() -> None:
    """This CPU's attention of a step's rows (each row's real tokens a block of queries at a time, over the
    positions up to the span's last only, in tiles of cached keys) against the compiled program's
    (`attend_cache`: every query over all kv_len positions): a prompt from position 0 over several spans
    and tiles, a chunk continuing a long sequence, a few tokens (a verify step's) and a padding row, blocks
    in any order; float32 and bfloat16 caches."""
    rng = _rng()
    block, kv_heads, group, head_dim, seq, kv_len = 8, 2, 3, 16, 40, 256
    tables = rng.permutation(100)[: 3 * kv_len // block].reshape(3, -1).astype(np.int32)
    starts, counts = [0, 150, 201], [40, 40, 5]
    positions = np.array([[start + min(s, n - 1) for s in range(seq)] for start, n in zip(starts, counts)], np.int32)
    valid = np.array([[s < n for s in range(seq)] for n in counts])
    q = _randn(rng, 3, kv_heads, group * seq, head_dim)
    for dtype in (np.float32, bfloat16):
        k_cache, v_cache = (_randn(rng, 100 * block, kv_heads * head_dim).astype(dtype) for _ in range(2))
        want = attend_cache(q.astype(dtype), k_cache, v_cache, table_index(tables, block), positions, kv_len=kv_len,
                            kv_tile=kv_len)
        q_rows, table_rows, at = (np.concatenate([a, a[:1]]) for a in (q.astype(dtype), tables, positions))
        got = _attend_rows(q_rows, k_cache, v_cache, table_rows, at, np.concatenate([valid, np.zeros((1, seq), bool)]),
                           block=block, kv_tile=32)
        mask = np.tile(valid, (1, group))[:, None, :, None]
        _close(got[:3] * mask, want * mask, rtol=1e-5 if dtype == np.float32 else 2e-2)
        assert not got[3].any()


def test_attention_qk_norm_spans_all_heads() -> None:
    """One RMSNorm over the whole q (heads x head_dim) width: scaling one head changes the others."""
    rng = _rng()
    hidden, heads, head_dim = 16, 4, 8
    wq = _randn(rng, hidden, heads * head_dim)
    boosted = wq.copy()
    boosted[:, :head_dim] *= 10.0
    x = _randn(rng, 1, 1, hidden)
    ones = np.ones(heads * head_dim, np.float32)
    q, q_boosted = rmsnorm(x @ wq, ones, 1e-6), rmsnorm(x @ boosted, ones, 1e-6)
    other_heads = slice(head_dim, None)
    assert not np.allclose(q[..., other_heads], q_boosted[..., other_heads]), "q norm must not be per head"
    _close(q_boosted[..., other_heads] * np.sqrt(np.mean(np.square(x @ boosted), axis=-1, keepdims=True)),
           (x @ wq)[..., other_heads])


def test_moe_router() -> None:
    rng = _rng()
    tokens, hidden, experts, top_k = 7, 16, 12, 3
    x, gate = _randn(rng, tokens, hidden), _randn(rng, hidden, experts)
    bias = _randn(rng, experts, scale=0.5)
    weights, chosen = moe_router(x, gate, bias, top_k)
    for t in range(tokens):
        scores = 1 / (1 + np.exp(-(x[t].astype(np.float64) @ gate)))
        pick = sorted(range(experts), key=lambda e: -(scores[e] + bias[e]))[:top_k]
        assert list(chosen[t]) == pick, f"token {t}: chose {list(chosen[t])}, expected {pick}"
        _close(weights[t], scores[pick] / scores[pick].sum())


def test_moe_router_bias_only_chooses() -> None:
    """A large bias forces an expert into the top-k, but its weight stays its unbiased sigmoid score."""
    x = np.ones((1, 2), np.float32)
    gate = np.array([[2.0, 1.0, -3.0], [2.0, 1.0, -3.0]], np.float32)
    bias = np.array([0.0, 0.0, 5.0], np.float32)
    weights, chosen = moe_router(x, gate, bias, 2)
    assert set(chosen[0]) == {0, 2}
    s = 1 / (1 + np.exp(-np.array([4.0, -6.0])))
    _close(np.sort(weights[0]), np.sort(s / s.sum()))


def test_moe_expert() -> None:
    rng = _rng()
    hidden, inter = 16, 12
    x = _randn(rng, 5, hidden)
    w1, w3, w2 = _randn(rng, inter, hidden), _randn(rng, inter, hidden), _randn(rng, hidden, inter)
    got = moe_expert(x, np.concatenate([w1, w3], axis=0), w2)
    want = np.stack([w2 @ (_silu(w1 @ row) * (w3 @ row)) for row in x.astype(np.float64)])
    _close(got, want)


def _ref_moe(x, gate, bias, w13, w2, top_k):
    out = np.zeros(x.shape)
    weights, chosen = moe_router(x, gate, bias, top_k)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = chosen[t, j]
            h = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (_silu(h[:inter]) * h[inter:]))
    return out


def test_moe_block() -> None:
    """One token (one row per block) and many (blocks of several rows) against a per-token loop."""
    rng = _rng()
    hidden, inter, experts, top_k = 16, 8, 12, 2
    gate, bias = _randn(rng, hidden, experts), _randn(rng, experts, scale=0.1)
    w13, w2 = _randn(rng, experts, 2 * inter, hidden), _randn(rng, experts, hidden, inter)
    for tokens, block_rows in ((1, 1), (5, 1), (40, 4), (40, DENSE)):
        x = _randn(rng, tokens, hidden)
        valid = np.arange(tokens) != tokens // 2
        got = moe_block(x, valid, gate, bias, w13, w2, top_k=top_k, block_rows=block_rows)
        _close(got, _ref_moe(x, gate, bias, w13, w2, top_k) * valid[:, None])


def test_grouped_experts() -> None:
    """Rows through their expert under every schedule (blocks of 1 to 128 rows, and dense), for spread,
    skewed (every row on one expert) and partly invalid routings; invalid rows come back as zeros and no
    valid row is lost."""
    rng = _rng()
    hidden, inter, experts, rows = 16, 8, 6, 48
    w13, w2 = _randn(rng, experts, 2 * inter, hidden), _randn(rng, experts, hidden, inter)
    x = _randn(rng, rows, hidden)
    spread = rng.integers(0, experts, rows)
    for ids, valid in (
        (spread, np.ones(rows, bool)),
        (np.full(rows, 3), np.ones(rows, bool)),
        (spread, rng.random(rows) < 0.5),
    ):
        want = np.stack([
            moe_expert(x[r : r + 1], w13[e], w2[e])[0] if ok else np.zeros(hidden, np.float32)
            for r, (e, ok) in enumerate(zip(ids, valid))
        ])
        for block_rows in (1, 2, 4, 8, 16, 32, 64, 128, DENSE, DYNAMIC):
            _close(grouped_experts(x, ids, valid, w13, w2, block_rows=block_rows), want)


def test_exclusive_cumsum() -> None:
    """Chunked triangular matmuls give the exclusive prefix sums at sizes that are and are not squares."""
    rng = _rng()
    for rows in (1, 7, 64, 300):
        values = rng.integers(0, 5, (rows, 3)).astype(np.int32)
        got = exclusive_cumsum(values)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.cumsum(values, axis=0) - values)


def test_place_rows() -> None:
    rng = _rng()
    x = _randn(rng, 5, 3)
    out = place_rows(x, np.array([4, 0, 2, 4, 1]), np.array([True, True, False, False, True]), 6)
    want = np.zeros((6, 3), np.float32)
    want[[4, 0, 1]] = x[[0, 1, 4]]
    np.testing.assert_array_equal(out, want)


def test_matmul_rows_together_and_apart() -> None:
    """Both schedules of a few rows by a weight (also stacked rows, and a transposed weight) give a @ b."""
    rng = _rng()
    a, weight = _randn(rng, 2, 3, 16), _randn(rng, 24, 16).T
    want = np.einsum("bik,kn->bin", a.astype(np.float64), weight.astype(np.float64))
    for apart in (False, True):
        _close(matmul(a, weight, apart), want)
        _close(matmul(a[0], weight, apart), want[0])


def test_lm_head_vocab_parallel_one_rank() -> None:
    """One rank holding the whole vocabulary, padded by two columns that must never win."""
    rng = _rng()
    h, norm, weight = _randn(rng, 6, 16), _randn(rng, 16), _randn(rng, 16, 40)
    padded = np.concatenate([weight, np.full((16, 2), 100.0, np.float32)], axis=1)
    offset = np.array([0, 0], np.int32)
    logits = vocab_slice_logits(h, norm, padded, offset, eps=1e-6, vocab_size=40)
    _close(gather_vocab(logits, 40, None), lm_head(h, norm, weight, 1e-6))
    np.testing.assert_array_equal(greedy_vocab_parallel(logits, offset, None), np.argmax(logits[:, :40], axis=-1))


def test_logprobs_vocab_parallel_one_rank() -> None:
    """log p = logit - log sum exp(logits) of each chosen token and of the 4 largest, the padding columns
    (masked, as vocab_slice_logits leaves them) left out of the sum."""
    rng = _rng()
    logits = _randn(rng, 3, 30, scale=3.0)
    masked = np.concatenate([logits, np.full((3, 2), np.finfo(np.float32).min, np.float32)], axis=1)
    chosen = np.array([4, 29, 0], np.int32)
    got, top, ids = logprobs_vocab_parallel(masked, np.array([0, 0], np.int32), chosen, top=4, replica_groups=None)
    for row in range(3):
        x = logits[row].astype(np.float64)
        want = [x[v] - np.log(sum(np.exp(x[u]) for u in range(30))) for v in range(30)]
        order = sorted(range(30), key=lambda v: -want[v])[:4]
        assert abs(got[row] - want[chosen[row]]) <= 1e-5 * abs(want[chosen[row]]) + 1e-6
        assert ids[row].tolist() == order
        _close(top[row], np.array([want[v] for v in order]))


def test_top_candidates() -> None:
    rng = _rng()
    logits = _randn(rng, 3, 50)
    ids = np.broadcast_to(np.arange(100, 150, dtype=np.int32), (3, 50))
    values, chosen = top_candidates(logits, ids, 7)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :7]
    np.testing.assert_array_equal(chosen, order + 100)
    _close(values, np.take_along_axis(logits, order, axis=1))


def test_top_candidates_by_partial_sort_equal_the_rounds_of_argmax() -> None:
    """This CPU's schedule (one partial sort) gives the device's candidates bit for bit, ties included (many
    equal logits, at the k-th too, and masked padding columns), in the same order."""
    rng = _rng()
    logits = np.round(_randn(rng, 6, 300, scale=2.0))  # integers: ties everywhere, the k-th among them
    logits[2, 250:] = np.finfo(np.float32).min  # a slice's padding, masked
    logits[3] = 0.0  # one row all tied
    ids = np.broadcast_to(np.arange(1000, 1300, dtype=np.int32), logits.shape)
    for k in (1, 7, 64, 250):
        want = top_candidates(logits, ids, k)
        got = top_candidates(logits, ids, k, partial_sort=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_sampling_draws_from_the_reference_distribution() -> None:
    """For every uniform draw, the kernel's token is the reference's inverse CDF of sampling_probs (top-k,
    top-p and temperature together), so both have exactly the reference distribution."""
    rng = _rng()
    logits = _randn(rng, 4, 30, scale=2.0)
    ids = np.broadcast_to(np.arange(30, dtype=np.int32), (4, 30))
    values, chosen = top_candidates(logits, ids, 30)
    settings = [(1.0, 5, 0.9), (0.7, 30, 1.0), (1.3, 12, 0.5), (0.5, 1, 1.0)]
    temperature = np.array([t for t, _, _ in settings], np.float32)
    top_k = np.array([k for _, k, _ in settings], np.int32)
    top_p = np.array([p for _, _, p in settings], np.float32)
    for u in np.linspace(0.0, 0.999, 37):
        got = sample_candidates(values, chosen, temperature, top_k, top_p, np.full(4, u, np.float32))
        want = [draw(sampling_probs(row, t, k, p), u) for row, (t, k, p) in zip(logits, settings)]
        np.testing.assert_array_equal(got, want)


def test_moe_block_parallel_one_rank() -> None:
    """The multi-rank MoE block on a single rank (collectives are the identity) against the loop;
    multi-rank layouts are checked in tests/test_moe_parallel.py and tests/test_torchrun.py."""
    rng = _rng()
    hidden, inter, experts, top_k, tokens = 16, 8, 6, 2, 5
    gate, bias = _randn(rng, hidden, experts), _randn(rng, experts, scale=0.1)
    w13, w2 = _randn(rng, experts, 2 * inter, hidden), _randn(rng, experts, hidden, inter)
    x = _randn(rng, tokens, hidden)
    one = [[0]]
    got, dropped = moe_block_parallel(
        x, np.arange(tokens, dtype=np.int32), np.zeros(tokens, np.int32), np.ones(tokens, bool),
        np.arange(top_k, dtype=np.int32), np.zeros(2, np.int32), np.zeros(2, np.int32), gate, bias, w13, w2,
        top_k=top_k, members=1, per_token=top_k, own_count=1, real_pairs=tokens * top_k,
        capacity=worst_case_capacity(tokens, top_k, experts),
        block_rows=1,
        slice_groups=one, ep_groups=one, combine_groups=one,
    )
    assert int(dropped[0]) == 0
    _close(got, _ref_moe(x, gate, bias, w13, w2, top_k))


def test_token_embedding() -> None:
    rng = _rng()
    table = _randn(rng, 50, 8)
    ids = np.array([[3, 49, 0], [7, 7, 1]])
    got = token_embedding(ids, table)
    assert all(np.array_equal(got[b, s], table[ids[b, s]]) for b in range(2) for s in range(3))


def test_lm_head_and_greedy() -> None:
    rng = _rng()
    h, norm, weight = _randn(rng, 2, 3, 16), _randn(rng, 16), _randn(rng, 16, 40)
    logits = lm_head(h, norm, weight, 1e-6)
    _close(logits, _ref_rmsnorm(h, norm, 1e-6) @ weight)
    picks = greedy_pick(logits[:, -1])
    assert [int(p) for p in picks] == [int(np.argmax(row)) for row in logits[:, -1]]
