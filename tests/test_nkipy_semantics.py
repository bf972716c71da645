"""The traced program is the NumPy program: every kernel and every declared device unit, run on arrays
that compute with nkipy's traced semantics (minimax_m2/device/nkipy_semantics.py, from
../shared/nkipy/SEMANTICS.md), equals plain NumPy, records no violation, stays inside the traceable
subset, and compiles to the same program on every rank. Deliberately wrong kernels show the check bites."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from thread_ranks import ThreadCollectives

from kernels import (
    DENSE,
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
    sample_candidates,
    token_embedding,
    top_candidates,
)
from kernels.slots import exclusive_cumsum, place_rows
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.expert_schedule import measured_table, roofline_cost
from minimax_m2.device.nkipy_semantics import EmulatedCollectives, LoopbackCollectives, outside_subset, trace_unit
from minimax_m2.device.program import program_units
from minimax_m2.device.roofline import TRN2
from minimax_m2.device.step import KV_BLOCK
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.model_weights import LAYER_WEIGHT_NAMES, model_dtype, random_model_weights

OPS_FILE = Path(__file__).resolve().parents[2] / "shared" / "nkipy" / "traceable_ops.json"
CONFIG = MiniMaxM2Config(
    vocab_size=250, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=8,
    num_key_value_heads=4, head_dim=16, num_local_experts=8, num_experts_per_tok=4, rotary_dim=8,
)
MAX_SEQ = 80
WEIGHTS = LAYER_WEIGHT_NAMES + ("embed", "final_norm", "lm_head")


@pytest.fixture(scope="module")
def allowed() -> dict | None:
    return json.loads(OPS_FILE.read_text()) if OPS_FILE.is_file() else None


def _copy(inputs: dict) -> dict:
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in inputs.items()}


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _mismatch(got, want) -> float:
    """Largest relative difference over the outputs (inf when shapes or dtypes differ)."""
    worst = 0.0
    for g, w in zip(_as_tuple(got), _as_tuple(want)):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape or g.dtype.kind != w.dtype.kind:
            return float("inf")
        diff = np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)), initial=0.0)
        worst = max(worst, diff / max(np.max(np.abs(w.astype(np.float64)), initial=0.0), 1e-30))
    return worst


def emulate(fn, inputs: dict, constants: dict | None = None):
    """(program, emulated outputs, plain NumPy outputs) of one call on one rank."""
    constants = constants or {}
    collectives.set_backend(EmulatedCollectives(LoopbackCollectives()))
    try:
        program, traced = trace_unit(fn, _copy(inputs), constants, WEIGHTS)
    finally:
        collectives.set_backend(None)
    collectives.set_backend(LoopbackCollectives())
    try:
        plain = fn(**_copy(inputs), **constants)
    finally:
        collectives.set_backend(None)
    return program, traced, plain


def assert_same_program_as_numpy(program, traced, plain, allowed, what: str) -> None:
    assert program.ops, f"{what}: nothing was recorded"
    assert program.violations == [], f"{what}: {program.violations}"
    if allowed is not None:
        assert outside_subset(program, allowed) == [], f"{what} calls what nkipy cannot trace"
    mismatch = _mismatch(traced, plain)
    assert mismatch <= 1e-6, f"{what}: traced result differs from NumPy by {mismatch:.3g}"


# --- single kernels ---------------------------------------------------------------------------------

def _kernel_cases():
    rng = np.random.default_rng(0)
    w = random_model_weights(CONFIG, list(range(8)), seed=0).layers[0]
    cos, sin = rope_tables(MAX_SEQ, CONFIG.rotary_dim, CONFIG.rope_theta)

    def x(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def cache():
        return np.zeros((11 * 16, 64), np.float32)  # ten blocks of 16 positions and the scratch, 4 KV heads x 16

    attn = dict(wq=w.wq, wk=w.wk, wv=w.wv, wo=w.wo, q_norm=w.q_norm, k_norm=w.k_norm, cos_table=cos, sin_table=sin)
    attn_k = dict(head_dim=16, eps=1e-6, block=16, kv_len=MAX_SEQ)
    tables = np.array([[7, 2, 9, 0, 4], [1, 8, 3, 6, 5]], np.int32)  # each row's five blocks, scattered
    ids, valid = rng.integers(0, 8, 40).astype(np.int32), rng.random(40) < 0.7
    ragged = np.array([True] * 5 + [True, True, False, False, False])
    yield "rmsnorm", rmsnorm, dict(x=x(2, 3, 64), weight=w.input_norm), dict(eps=1e-6)
    yield "rope_partial", rope_partial, dict(x=x(6, 4, 16), cos=cos[:6], sin=sin[:6]), {}
    yield "attention prefill", attention, dict(x=x(10, 64), positions=np.tile(np.arange(5, dtype=np.int32), 2),
                                               kv_blocks=tables[::-1].copy(), token_valid=ragged, **attn,
                                               k_cache=cache(), v_cache=cache()), dict(attn_k, seq=5)
    yield "attention decode", attention, dict(x=x(2, 64), positions=np.array([7, 3], np.int32),
                                              kv_blocks=tables, token_valid=np.ones(2, bool),
                                              **attn, k_cache=cache(), v_cache=cache()), dict(attn_k, seq=1)
    tiles = np.array([[1, 8, 16], [0, 7, 0], [1, 1, 0], [0, 2, 16], [0, 10, 1 << 30], [0, 10, 1 << 30]], np.int32)
    yield "attention decode over tiles", attention, dict(x=x(2, 64), positions=np.array([20, 17], np.int32),
                                                         kv_blocks=tiles, token_valid=np.array([True, True]), **attn,
                                                         k_cache=cache(), v_cache=cache()), dict(attn_k, seq=1,
                                                                                                 ragged=True)
    yield "attention prefill in tiles", attention, dict(x=x(10, 64), positions=np.tile(np.arange(5, dtype=np.int32), 2),
                                                        kv_blocks=tables[::-1].copy(), token_valid=ragged, **attn,
                                                        k_cache=cache(), v_cache=cache()), \
        dict(attn_k, seq=5, kv_tile=MAX_SEQ // 4)
    yield "moe_router", moe_router, dict(x=x(6, 64), gate=w.gate, bias=w.bias), dict(top_k=4)
    yield "moe_expert", moe_expert, dict(x=x(3, 64), w13=w.w13[0], w2=w.w2[0]), {}
    experts = dict(gate=w.gate, bias=w.bias, w13=w.w13, w2=w.w2)
    yield "moe_block decode", moe_block, dict(x=x(2, 64), valid=np.array([True, False]), **experts), \
        dict(top_k=4, block_rows=1)
    yield "moe_block prefill", moe_block, dict(x=x(40, 64), valid=valid, **experts), dict(top_k=4, block_rows=8)
    for block_rows in (1, 2, 4, 8, 16, 32, 64, 128, DENSE):
        yield f"grouped_experts blocks of {block_rows or 'all (dense)'}", grouped_experts, dict(
            x=x(40, 64), expert_ids=ids, valid=valid, w13=w.w13, w2=w.w2), dict(block_rows=block_rows)
    one = dict(x=x(40, 64), expert_ids=np.full(40, 5, np.int32), valid=np.ones(40, bool), w13=w.w13, w2=w.w2)
    yield "grouped_experts one expert", grouped_experts, one, dict(block_rows=4)
    yield "exclusive_cumsum", exclusive_cumsum, dict(values=rng.integers(0, 3, (300, 5)).astype(np.int32)), {}
    yield "place_rows", place_rows, dict(x=x(3, 64), slot=np.array([2, 0, 5], np.int32),
                                         valid=np.array([True, False, True])), dict(num_slots=6)
    yield "token_embedding", token_embedding, dict(input_ids=rng.integers(0, 250, (2, 3)).astype(np.int32),
                                                   table=x(250, 64)), {}
    yield "lm_head", lm_head, dict(h=x(2, 64), norm_weight=w.input_norm, weight=x(64, 250)), dict(eps=1e-6)
    yield "greedy_pick", greedy_pick, dict(logits=x(2, 250)), {}
    yield "top_candidates", top_candidates, dict(logits=x(3, 250),
                                                 ids=np.tile(np.arange(250, dtype=np.int32), (3, 1))), \
        dict(k=16)
    yield "sample_candidates", sample_candidates, dict(
        values=np.sort(x(3, 16))[:, ::-1].copy(), ids=rng.integers(0, 250, (3, 16)).astype(np.int32),
        temperature=np.array([0.7, 1.0, 1.3], np.float32), top_k=np.array([4, 16, 1], np.int32),
        top_p=np.array([0.9, 1.0, 0.5], np.float32), uniform=np.array([0.1, 0.5, 0.99], np.float32)), {}


KERNELS = list(_kernel_cases())


@pytest.mark.parametrize("name, fn, inputs, constants", KERNELS, ids=[k[0] for k in KERNELS])
def test_kernel_traces_to_the_numpy_program(allowed, name, fn, inputs, constants) -> None:
    assert_same_program_as_numpy(*emulate(fn, inputs, constants), allowed, name)


# --- the declared device units, over ranks ---------------------------------------------------------

def _rank_units(world: int, tp: int, moe_tp: int, rank: int, phase: str, batch: int, seq: int, skewed: bool,
                dtype: str = "float32", target: str = "trn", **variant):
    layout = ParallelLayout(world, tp, rank, moe_tp=moe_tp)
    weights = random_model_weights(CONFIG, list(range(8)), seed=1, layout=layout, dtype=model_dtype(dtype))
    if skewed:  # every token chooses experts 0..3: all on rank 0
        weights.layers[0].bias[:4] += 100.0
    longest = variant.pop("max_seq_len", MAX_SEQ)
    rope = tuple(t.astype(weights.embed.dtype) for t in rope_tables(longest, CONFIG.rotary_dim, CONFIG.rope_theta))
    variant.setdefault("position", 0 if phase == "prefill" else 9)
    return program_units(CONFIG, layout, weights, rope, TARGETS[target](weights.layers[0]), phase=phase, batch=batch,
                         seq=seq, max_seq_len=longest, **variant)


def _trn_cost(layer):
    """A NeuronCore's cost of one expert (the roofline's TRN2 figures)."""
    weight_bytes = layer.w13[0].nbytes + layer.w2[0].nbytes
    return roofline_cost(weight_bytes, 2 * (layer.w13[0].size + layer.w2[0].size), TRN2.memory_bytes_per_s,
                         TRN2.matmul_flops_per_s)


# A CPU's cost of one expert, as measured here for the medium model (ms): one row streams the weights, BLAS
# packs them for two or more rows.
CPU_TIMES = {1: 0.31, 2: 0.85, 4: 0.87, 8: 0.87, 16: 0.95, 32: 1.27, 64: 1.6, 128: 2.4}
TARGETS = {"trn": _trn_cost, "cpu": lambda layer: measured_table(CPU_TIMES)}


def run_ranks(world: int, tp: int, moe_tp: int, phase: str, batch: int, seq: int, skewed: bool = False,
              dtype: str = "float32", target: str = "trn", **variant):
    """Each rank's units, run emulated and plain with ranks as threads -> per rank [(unit, program, traced, plain)]."""
    def body(rank: int, emulated: bool):
        results = []
        for unit in _rank_units(world, tp, moe_tp, rank, phase, batch, seq, skewed, dtype, target, **variant):
            if emulated:
                results.append((unit.name, *trace_unit(unit.fn, _copy(unit.inputs), unit.constants, WEIGHTS)))
            else:
                results.append(unit.fn(**_copy(unit.inputs), **unit.constants))
        return results

    outcomes = []
    for emulated in (True, False):
        backend = ThreadCollectives(world)
        collectives.set_backend(EmulatedCollectives(backend) if emulated else backend)
        try:
            outcomes.append(backend.run(lambda r: body(r, emulated)))
        finally:
            collectives.set_backend(None)
    traced, plain = outcomes
    return [[(name, program, out, want) for (name, program, out), want in zip(t, p)] for t, p in zip(traced, plain)]


LAYOUTS = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 1, 1), (4, 2, 1), (2, 1, 2), (4, 2, 4), (4, 1, 2), (4, 2, 2), (4, 4, 4)]
SHAPES = [("prefill", 2, 6, False), ("prefill", 2, 64, False), ("decode", 3, 1, False), ("prefill", 2, 6, True),
          ("decode", 1, 1, True)]


@pytest.mark.parametrize("world, tp, moe_tp", LAYOUTS, ids=[f"w{w}-tp{t}-moetp{m}" for w, t, m in LAYOUTS])
@pytest.mark.parametrize("phase, batch, seq, skewed", SHAPES,
                         ids=["prefill", "long-prefill", "decode", "prefill-skewed", "decode-skewed"])
@pytest.mark.parametrize("target", ["trn", "cpu"])
def test_device_units_trace_to_the_numpy_program(allowed, world, tp, moe_tp, phase, batch, seq, skewed, target) -> None:
    """Each layout and shape, with the expert schedule a NeuronCore's costs and this CPU's costs choose."""
    ranks = run_ranks(world, tp, moe_tp, phase, batch, seq, skewed, target=target)
    for rank, units in enumerate(ranks):
        for name, program, traced, plain in units:
            assert_same_program_as_numpy(program, traced, plain, allowed, f"rank {rank} {name}")
    first, last = ranks[0], ranks[-1]
    for (name, program, _, _), (_, other, _, _) in zip(first, last):
        assert program.ops == other.ops, f"{name}: rank 0 and rank {world - 1} trace different programs"
        assert program.constants == other.constants, f"{name}: rank 0 and rank {world - 1} bake in different constants"


@pytest.mark.parametrize("phase, batch, seq", [("prefill", 2, 8), ("decode", 16, 1), ("decode", 8, 1)])
def test_both_exchanges_into_the_moe_give_the_same_bits(phase, batch, seq) -> None:
    """Attention tp 4 in a slice group of 4: the attention output reaches the MoE by one all_gather of every
    member's rows, or (`scatter`, the schedule of a step of 16 tokens or more that tp divides) by an all_to_all
    over the tp group and an all_gather of a quarter of the rows: the same sums in the same order, in
    bfloat16."""
    def body(rank: int, scatter: bool):
        unit = _rank_units(4, 4, 4, rank, phase, batch, seq, False, dtype="bfloat16")[1]
        assert unit.constants["scatter"] == (batch * seq >= 16), "a step of 16 tokens or more scatters"
        return unit.fn(**_copy(unit.inputs), **dict(unit.constants, scatter=scatter))

    results = []
    for scatter in (True, False):
        backend = ThreadCollectives(4)
        collectives.set_backend(backend)
        try:
            results.append(backend.run(lambda rank: body(rank, scatter)))
        finally:
            collectives.set_backend(None)
    for rank, (scattered, gathered) in enumerate(zip(*results)):
        assert np.array_equal(scattered.astype(np.float32), gathered.astype(np.float32)), f"rank {rank}"
        assert np.any(scattered.astype(np.float32) != 0)


@pytest.mark.parametrize("world, tp", [(2, 1), (4, 2)])
@pytest.mark.parametrize("samples, return_logits, logprobs, masks", [
    (False, False, False, 0), (False, True, False, 0), (True, True, False, 0), (True, False, True, 0),
    (False, False, False, 2), (True, True, False, 4), (True, False, True, 2)])
def test_each_lm_head_variant_traces_to_the_numpy_program(allowed, world, tp, samples, return_logits,
                                                          logprobs, masks) -> None:
    """The lm_head without sampling (a step with no row to sample), with the logits returned, with the
    log-probabilities returned, and with grammar masks."""
    ranks = run_ranks(world, tp, 1, "decode", 3, 1, samples=samples, return_logits=return_logits, logprobs=logprobs,
                      masks=masks)
    for rank, units in enumerate(ranks):
        name, program, traced, plain = units[-1]
        assert name == "lm_head"
        assert_same_program_as_numpy(program, traced, plain, allowed, f"rank {rank} {name}")
        outputs = plain if isinstance(plain, tuple) else (plain,)
        assert len(outputs) == 1 + 3 * logprobs + return_logits
        argmaxes = sum("argmax" in op[0] for op in program.ops)
        assert argmaxes >= 1 and (argmaxes > 2) == bool(samples or logprobs or masks), \
            f"{argmaxes} argmax: greedy, or top ones (a step with masks always may sample)"
    assert ranks[0][-1][1].ops == ranks[-1][-1][1].ops


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 1, 1), (4, 2, 2)])
def test_a_verify_step_traces_to_the_numpy_program(allowed, world, tp, moe_tp) -> None:
    """Speculative decoding's verify step: the decode rows each with its last token and 4 drafts, a prefill's
    layer unit and the lm_head choosing the next token of every position (sampled rows too)."""
    ranks = run_ranks(world, tp, moe_tp, "prefill", 4, 5, every_position=True)
    for rank, units in enumerate(ranks):
        for name, program, traced, plain in units:
            assert_same_program_as_numpy(program, traced, plain, allowed, f"rank {rank} {name}")
        ids = units[-1][3]
        assert np.asarray(ids if not isinstance(ids, tuple) else ids[0]).size == 4 * 5, "every position's next token"


def test_bfloat16_units_run_bf16_matmuls_except_the_router() -> None:
    for name, program, traced, plain in run_ranks(2, 1, 1, "prefill", 2, 6, dtype="bfloat16")[0]:
        assert program.violations == []
        assert _mismatch(traced, plain) <= 1e-6
        for m in program.matmuls:
            if m.weight:
                assert m.dtype == ("float32" if m.weight == "gate" else "bfloat16"), f"{name}: {m}"
        if name == "prefill_layer":
            assert any(m.weight == "gate" and m.dtype == "float32" for m in program.matmuls)
            activations = [m for m in program.matmuls if m.weight is None and m.dtype == "bfloat16"]
            assert len(activations) >= 2, "attention's q k^T and p v must be bf16 matmuls"


# --- the check catches each cause of a wrong traced program --------------------------------------

def _count_positive(x):
    """Cause 1: a boolean sum is an OR once traced."""
    return np.sum(x > 0, axis=0)


def _gather_at_cumsum(x, ids):
    """Cause 2: an integer cumsum is float32 once traced, invalid as an index."""
    return np.take(x, np.cumsum(ids) - 1, axis=0)


def _floor_div(ids):
    """Cause 3: integer // is invalid HLO."""
    return ids // 2


def _negative_take(x, ids):
    """Cause 4: a negative gather index is clamped, not wrapped."""
    return np.take(x, ids - 1, axis=0)


def _int_divide(ids):
    """Cause 4: integer / stays integer."""
    return ids / 2


def _constant_result(x):
    """Cause 5: a result not computed from the inputs."""
    return x + 1, np.zeros((), np.int32)


def _constant_matmul(x):
    """nkipy's dot takes no NumPy constant operand (found tracing kernels/slots.py with nkipy itself)."""
    return np.tril(np.ones((2, 2), np.float32)) @ x


@dataclass
class _Weights:
    w: np.ndarray


def _dataclass_weights(x, weights):
    """Cause 5: weights inside a dataclass are baked in."""
    return x @ weights.w


def _rank_constant(x, *, slots):
    """Cause 5: a rank-specific array passed as a constant."""
    return np.take(x, slots, axis=0)


def _int64_constant(x):
    """A 64-bit constant (np.arange without a dtype) in the program."""
    return x + np.arange(x.shape[0])


def _size_one_output(x):
    """An output with a dimension of 1: the Neuron compiler squeezes it."""
    return x[:, :1]


WRONG = [
    ("bool sum", _count_positive, dict(x=np.array([[1.0, -1.0], [2.0, 3.0]], np.float32)), {}, None),
    ("integer cumsum index", _gather_at_cumsum, dict(x=np.eye(3, dtype=np.float32), ids=np.array([1, 1, 1], np.int32)),
     {}, "float array used as an index"),
    ("integer //", _floor_div, dict(ids=np.array([3, 4], np.int32)), {}, "integer np.floor_divide"),
    ("negative take", _negative_take, dict(x=np.eye(3, dtype=np.float32), ids=np.array([0, 2], np.int32)), {}, None),
    ("integer /", _int_divide, dict(ids=np.array([3, 4], np.int32)), {}, None),
    ("constant matmul operand", _constant_matmul, dict(x=np.ones((2, 3), np.float32)), {},
     "constant as a matmul operand"),
    ("constant result", _constant_result, dict(x=np.ones(2, np.float32)), {}, "not computed from the inputs"),
    ("dataclass weights", _dataclass_weights, dict(x=np.ones((1, 2), np.float32),
                                                   weights=_Weights(np.eye(2, dtype=np.float32))),
     {}, "not an array: baked in"),
    ("rank constant", _rank_constant, dict(x=np.eye(3, dtype=np.float32)), dict(slots=np.array([1], np.int32)),
     "holds an array"),
    ("int64 constant", _int64_constant, dict(x=np.ones(3, np.int32)), {}, "int64 constant"),
    ("size-1 output", _size_one_output, dict(x=np.ones((3, 2), np.float32)), {}, "a dimension of size 1"),
    ("size-1 input", lambda x: x + 1, dict(x=np.ones((1, 4), np.float32)), {}, "a dimension of size 1"),
]


@pytest.mark.parametrize("name, fn, inputs, constants, violation", WRONG, ids=[w[0] for w in WRONG])
def test_the_check_catches_a_wrong_kernel(name, fn, inputs, constants, violation) -> None:
    """Each kernel gives NumPy's answer eagerly; traced, it either records the named violation or
    computes something else (None: a silent difference, caught by the comparison with NumPy)."""
    program, traced, plain = emulate(fn, inputs, constants)
    if violation is None:
        assert program.violations == []
        assert _mismatch(traced, plain) > 1e-6, f"{name}: the emulation did not reproduce nkipy's result"
    else:
        assert any(violation in v for v in program.violations), program.violations


def test_all_to_all_dimensions_must_match() -> None:
    def swap(x):
        return collectives.all_to_all(x, 0, 1, [[0, 1]])

    program, _, _ = emulate(swap, dict(x=np.ones((2, 2), np.float32)))
    assert any("concat_dimension" in v for v in program.violations)


def test_value_dependent_branch_is_caught() -> None:
    def branch(x):
        return x if np.max(x) > 0 else -x

    program, _ = trace_unit(branch, dict(x=np.ones(3, np.float32)), {})
    assert any("bool()" in v for v in program.violations)


def test_subset_check_names_untraceable_calls(allowed) -> None:
    if allowed is None:
        pytest.skip(f"{OPS_FILE} is absent: the nkipy traceable subset ships in ../shared beside the repository")
    program, _, _ = emulate(lambda x: np.argsort(x), dict(x=np.arange(3.0, dtype=np.float32)))
    assert "np.argsort" in outside_subset(program, allowed)


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 1, 1), (4, 2, 2), (4, 1, 4)])
@pytest.mark.parametrize("phase, batch, seq", [("prefill", 4, 40), ("prefill", 4, 5), ("decode", 3, 1)])
@pytest.mark.parametrize("target", ["trn", "cpu"])
def test_a_spread_step_traces_to_the_numpy_program(allowed, world, tp, moe_tp, phase, batch, seq, target) -> None:
    """Context parallelism: every row's cache striped over the attention groups, each group attending every
    group's queries against its blocks and the parts combined by an all_to_all."""
    position = 3 * KV_BLOCK + 20 if phase == "prefill" else 5 * KV_BLOCK + 9  # the rows' blocks in every group
    ranks = run_ranks(world, tp, moe_tp, phase, batch, seq, target=target, spread=True, position=position,
                      max_seq_len=8 * KV_BLOCK)
    for rank, units in enumerate(ranks):
        for name, program, traced, plain in units:
            assert_same_program_as_numpy(program, traced, plain, allowed, f"rank {rank} {name}")
        spread_groups = tuple(map(tuple, ParallelLayout(world, tp).spread_groups))
        exchanged = [c.name for c in units[1][1].collectives if c.replica_groups == spread_groups]
        assert exchanged[:2] == ["all_gather", "all_to_all"], f"rank {rank}: {exchanged}"  # then the MoE's, if any
    assert ranks[0][1][1].ops == ranks[-1][1][1].ops
