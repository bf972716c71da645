"""Every kernel, run on recording arrays, calls only what nkipy can trace (../shared/nkipy/traceable_ops.json)."""

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from tracer import Record, Recorded, RecordingCollectives, violations

from kernels import (
    attention,
    collectives,
    greedy_pick,
    grouped_experts,
    lm_head,
    moe_block,
    moe_expert,
    moe_router,
    rmsnorm,
    rope_partial,
    rope_tables,
    token_embedding,
)
from kernels.moe_dispatch import moe_block_ep, worst_case_capacity
from kernels.slots import place_rows
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.layer import decoder_layer
from minimax_m2.weights import LayerWeights, random_model_weights

OPS_FILE = Path(__file__).resolve().parents[2] / "shared" / "nkipy" / "traceable_ops.json"
CONFIG = MiniMaxM2Config(
    vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2, rotary_dim=4,
)
MAX_SEQ = 16


@pytest.fixture(scope="module")
def allowed() -> dict:
    if not OPS_FILE.is_file():
        pytest.skip(f"{OPS_FILE} is absent: the nkipy traceable subset ships in ../shared beside the repository")
    return json.loads(OPS_FILE.read_text())


def _trace(fn, *args, **kwargs):
    """Run fn with every ndarray argument recorded; returns (record, plain result)."""
    record = Record()
    wrapped = [Recorded(a, record) if isinstance(a, np.ndarray) else a for a in args]
    result = fn(*wrapped, **kwargs)
    plain = [r.value if isinstance(r, Recorded) else r for r in (result if isinstance(result, tuple) else (result,))]
    return record, plain


def _rng_inputs():
    rng = np.random.default_rng(0)
    weights = random_model_weights(CONFIG, list(range(CONFIG.num_local_experts)), seed=0)
    cos, sin = rope_tables(MAX_SEQ, CONFIG.rotary_dim, CONFIG.rope_theta)
    return rng, weights, cos, sin


def _cases():
    rng, weights, cos, sin = _rng_inputs()
    w = weights.layers[0]
    c = CONFIG

    def cache():
        return np.zeros((2, c.num_key_value_heads, MAX_SEQ, c.head_dim), np.float32)

    def x(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    attn_kw = dict(head_dim=c.head_dim, eps=1e-6, kv_len=MAX_SEQ)
    attn_w = (w.wq, w.wk, w.wv, w.wo, w.q_norm, w.k_norm, cos, sin)
    yield "rmsnorm", rmsnorm, (x(2, 3, 32), w.input_norm, 1e-6), {}
    yield "rope_partial", rope_partial, (x(2, 3, 4, 8), cos[:3], sin[:3]), {}
    yield "attention prefill", attention, (x(2, 5, 32), np.arange(5, dtype=np.int32), *attn_w, cache(), cache()), attn_kw
    yield "attention decode", attention, (x(2, 1, 32), np.array([7], np.int32), *attn_w, cache(), cache()), attn_kw
    yield "moe_router", moe_router, (x(6, 32), w.gate, w.bias, 2), {}
    yield "moe_expert", moe_expert, (x(3, 32), w.w13[0], w.w2[0]), {}
    yield "moe_block decode", moe_block, (x(2, 32), w.gate, w.bias, w.w13, w.w2), {"top_k": 2}
    yield "moe_block prefill", moe_block, (x(40, 32), w.gate, w.bias, w.w13, w.w2), {"top_k": 2}
    ids, valid = rng.integers(0, 8, 40), rng.random(40) < 0.7
    yield "grouped_experts", grouped_experts, (x(40, 32), ids, valid, w.w13, w.w2), {}
    yield "token_embedding", token_embedding, (rng.integers(0, 64, (2, 3)).astype(np.int32), weights.embed), {}
    yield "lm_head", lm_head, (x(2, 1, 32), weights.final_norm, weights.lm_head, 1e-6), {}
    yield "greedy_pick", greedy_pick, (x(2, 64),), {}
    names = [f.name for f in fields(LayerWeights)]

    def layer(h, pos, k, v, cos_t, sin_t, *layer_weights):
        """Weights are kernel arguments too, as on device."""
        return decoder_layer(h, pos, LayerWeights(*layer_weights), k, v, (cos_t, sin_t), c, MAX_SEQ)

    yield "decoder_layer", layer, (
        x(2, 4, 32), np.arange(4, dtype=np.int32), cache(), cache(), cos, sin, *(getattr(w, n) for n in names)), {}


CASES = list(_cases())


@pytest.mark.parametrize("name, fn, args, kwargs", CASES, ids=[c[0] for c in CASES])
def test_kernel_is_traceable(allowed, name, fn, args, kwargs) -> None:
    plain_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    record, traced = _trace(fn, *args, **kwargs)
    assert record.functions, f"{name}: nothing was recorded, the tracer did not see the kernel's work"
    assert violations(record, allowed) == [], f"{name} uses what nkipy cannot trace"
    plain = fn(*plain_args, **kwargs)
    for got, want in zip(traced, plain if isinstance(plain, tuple) else (plain,)):
        assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), f"{name}: recording changed the result"


def test_tensor_parallel_norm_uses_the_collective(allowed) -> None:
    """With heads split over two ranks, the norm's sum of squares goes through collectives.all_reduce."""
    record = Record()
    collectives.set_backend(RecordingCollectives(record))
    try:
        rng = np.random.default_rng(0)
        rmsnorm(Recorded(rng.standard_normal((2, 16)).astype(np.float32), record), np.ones(16, np.float32), 1e-6, [[0, 1]])
    finally:
        collectives.set_backend(None)
    assert "collectives.all_reduce" in record.functions
    assert violations(record, allowed) == []


def _argsort_kernel(x):
    return np.argsort(x, axis=-1)


def _mask_kernel(x):
    return x[x > 0]


def _branching_kernel(x):
    return x if np.max(x) > 0 else -x


@pytest.mark.parametrize("kernel, expected", [
    (_argsort_kernel, "np.argsort"),
    (_mask_kernel, "boolean-mask indexing"),
    (_branching_kernel, "bool()"),
])
def test_tracer_catches_untraceable_code(allowed, kernel, expected) -> None:
    record = Record()
    try:
        kernel(Recorded(np.arange(-3.0, 3.0), record))
    except TypeError:
        pass
    assert any(expected in v for v in violations(record, allowed))


def _distributed_cases():
    rng, weights, cos, sin = _rng_inputs()
    w = weights.layers[0]
    c = CONFIG
    x = rng.standard_normal((3, 32)).astype(np.float32)
    groups = [[0, 1]]
    yield "moe_block_ep", moe_block_ep, (x, w.gate, w.bias, w.w13[:4], w.w2[:4], np.array([1])), dict(
        top_k=2, capacity=worst_case_capacity(3, 1, 4), ep_groups=groups, tp_groups=groups), ("all_to_all", "all_reduce")
    half_q, half_kv = c.num_attention_heads * c.head_dim // 2, c.num_key_value_heads * c.head_dim // 2
    cache = np.zeros((1, c.num_key_value_heads // 2, MAX_SEQ, c.head_dim), np.float32)
    yield "attention tp", attention, (
        rng.standard_normal((1, 2, 32)).astype(np.float32), np.arange(2, dtype=np.int32), w.wq[:, :half_q],
        w.wk[:, :half_kv], w.wv[:, :half_kv], w.wo[:half_q], w.q_norm[:half_q], w.k_norm[:half_kv], cos, sin,
        cache, cache.copy()), dict(head_dim=c.head_dim, eps=1e-6, kv_len=MAX_SEQ, replica_groups=groups), ("all_reduce",)
    yield "place_rows", place_rows, (x, np.array([2, 0, 5]), np.array([True, False, True])), dict(num_slots=6), ()


DISTRIBUTED = list(_distributed_cases())


@pytest.mark.parametrize("name, fn, args, kwargs, expected", DISTRIBUTED, ids=[c[0] for c in DISTRIBUTED])
def test_distributed_kernel_is_traceable(allowed, name, fn, args, kwargs, expected) -> None:
    """Kernels over two ranks, their collectives recorded (each rank's part played with its own data)."""
    record = Record()
    collectives.set_backend(RecordingCollectives(record))
    try:
        wrapped = [Recorded(a, record) if isinstance(a, np.ndarray) else a for a in args]
        fn(*wrapped, **kwargs)
    finally:
        collectives.set_backend(None)
    assert {f"collectives.{c}" for c in expected} <= record.functions
    assert violations(record, allowed) == [], f"{name} uses what nkipy cannot trace"
