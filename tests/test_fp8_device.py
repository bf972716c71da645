"""FP8 weights kept as 8-bit codes and dequantised inside the units: every float8_e4m3fn code decodes to
its exact value, every rank's slice keeps the checkpoint's exact block scales, and the model gives the
logits of the dequantise-at-load path at every layout, as the units would be traced."""

import ml_dtypes
import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import relative_error
from thread_ranks import ThreadCollectives

from kernels import collectives
from kernels.fp8 import dequantize, e4m3fn_values
from minimax_m2 import MiniMaxM2Model
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.nkipy_semantics import EmulatedCollectives, LoopbackCollectives, trace_unit
from minimax_m2.device.program import program_units
from minimax_m2.device.roofline import TRN2, expert_cost
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.checkpoint import Checkpoint, expert_key
from minimax_m2.weights.model_weights import block_scales, load_model_weights, rank_shapes

CODES = np.arange(256, dtype=np.uint8)


@pytest.mark.parametrize("stored", [np.uint8, np.int8], ids=["uint8", "int8"])
def test_every_code_decodes_to_its_exact_value(stored) -> None:
    """All 256 bit patterns, as uint8 (the host's) or int8 (a NeuronCore's tensor): the float32 bits of
    ml_dtypes' float8_e4m3fn values, signed zeros included; 0x7F and 0xFF are NaN."""
    want = CODES.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = e4m3fn_values(CODES.view(stored))
    nan = np.isnan(want)
    assert np.flatnonzero(nan).tolist() == [0x7F, 0xFF] and np.isnan(got[nan]).all()
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.signbit(got[0x80]) and got[0x80] == 0 and got[0x7E] == 448 and got[0x01] == 2.0**-9


@pytest.mark.parametrize("rows, cols", [(slice(None), slice(None)), (slice(32, 64), slice(None)),
                                        (slice(24, 48), slice(None)), (slice(None), slice(8, 40)),
                                        (slice(5, 7), slice(16, 17))],
                         ids=["whole", "whole-blocks", "rows-through-blocks", "cols-through-blocks", "tiny"])
def test_a_slice_keeps_the_checkpoint_scales_exactly(rows, cols) -> None:
    """Blocks of 16 x 16 over a 64 x 48 weight: the slice's dequantised values are bit for bit those of
    the whole weight dequantised element by element, however the slice cuts the blocks."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 48), dtype=np.uint8)
    codes[(codes & 127) == 127] = 0  # no NaN codes: a checkpoint holding them is refused
    grid = rng.uniform(0.01, 2.0, (4, 3)).astype(np.float32)
    whole = e4m3fn_values(codes) * np.repeat(np.repeat(grid, 16, axis=0), 16, axis=1)
    part = dequantize(codes[rows, cols], block_scales(grid, (16, 16), codes.shape, rows, cols), np.dtype(np.float32))
    assert np.array_equal(part.view(np.uint32), whole[rows, cols].view(np.uint32))


def test_loaded_codes_are_the_checkpoint_bytes(fp8_checkpoint) -> None:
    """With keep_fp8, a rank's expert codes are the stored bytes of its intermediate slice (moe_tp 4 cuts
    the 16-row blocks), and the units' dequantisation gives what the dequantise-at-load path reads."""
    config = MiniMaxM2Config.from_pretrained(fp8_checkpoint)
    layout = ParallelLayout(4, 1, 1, moe_tp=4)
    model = MiniMaxM2Model.from_pretrained(fp8_checkpoint, layout=layout, max_seq_len=16, keep_fp8=True)
    layer = model.weights.layers[0]
    assert layer.w13.dtype == np.uint8 and layer.wq.dtype == np.float32  # projections dequantised when loaded
    part = layout.intermediate_slice(config.intermediate_size)
    ckpt = Checkpoint(fp8_checkpoint, config, list(range(config.num_local_experts)))
    codes, _ = ckpt.read_fp8(expert_key(0, 3, "w1"))
    assert np.array_equal(layer.w13[3, : part.stop - part.start], codes[part])
    got = dequantize(layer.w2[3], layer.w2_scale[3], np.dtype(np.float32))
    assert np.array_equal(got, ckpt.read(expert_key(0, 3, "w2"))[:, part])


LAYOUTS = [(1, 1, 1), (2, 1, 2), (4, 2, 2), (4, 1, 4), (2, 2, 1)]


@pytest.mark.parametrize("world, tp, moe_tp", LAYOUTS, ids=[f"w{w}-tp{t}-moetp{m}" for w, t, m in LAYOUTS])
def test_fp8_in_the_units_gives_the_dequantised_logits(fp8_checkpoint, world, tp, moe_tp) -> None:
    """Ranks as threads, float32 activations: the logits of prefill and every decode step within 1e-6 of
    the model whose FP8 weights were dequantised at load, and the same greedy tokens."""
    want_ids, want = MiniMaxM2Model.from_pretrained(fp8_checkpoint, max_seq_len=32).generate(
        PROMPT, 5, return_logits=True)
    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(lambda r: MiniMaxM2Model.from_pretrained(
            fp8_checkpoint, max_seq_len=32, layout=ParallelLayout(world, tp, r, moe_tp=moe_tp), keep_fp8=True
        ).generate(PROMPT, 5, return_logits=True))
    finally:
        collectives.set_backend(None)
    for ids, logits in results:
        np.testing.assert_array_equal(ids, want_ids)
        assert relative_error(logits, want) < 1e-6


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_fp8_layer_unit_traces_to_the_numpy_program(fp8_checkpoint, phase) -> None:
    """The layer unit with FP8 codes and scales as inputs, under nkipy's emulated semantics: the traced
    program computes what NumPy computes, and the codes reach it as 8-bit inputs."""
    model = MiniMaxM2Model.from_pretrained(fp8_checkpoint, max_seq_len=32, keep_fp8=True)
    unit = program_units(model.config, model.layout, model.weights, model.rope,  # a NeuronCore's schedule
                         expert_cost(TRN2, model.weights.layers[0]), phase=phase, batch=2, seq=6, max_seq_len=32)[1]
    assert unit.inputs["w13"].dtype == np.uint8 and "w13_scale" in unit.inputs
    collectives.set_backend(EmulatedCollectives(LoopbackCollectives()))
    try:
        program, traced = trace_unit(unit.fn, {k: np.array(v) for k, v in unit.inputs.items()}, unit.constants,
                                     ("w13", "w2"))
    finally:
        collectives.set_backend(None)
    assert not program.violations, program.violations
    plain = unit.fn(**{k: np.array(v) for k, v in unit.inputs.items()}, **unit.constants)
    np.testing.assert_allclose(np.asarray(traced, np.float32), np.asarray(plain, np.float32), rtol=0, atol=0)


@pytest.mark.parametrize("world, tp, moe_tp", [(1, 1, 1), (4, 1, 4), (4, 2, 2), (2, 2, 1)],
                         ids=["one-rank", "w4-moetp4", "w4-tp2-moetp2", "w2-tp2"])
def test_the_memory_plan_counts_what_is_loaded(fp8_checkpoint, world, tp, moe_tp) -> None:
    """The shapes and dtypes the memory plan counts for FP8 weights kept as codes are those every rank loads
    (codes, per-block or per-row scales, its embedding rows)."""
    config = MiniMaxM2Config.from_pretrained(fp8_checkpoint)
    experts = list(range(config.num_local_experts))
    for rank in range(world):
        layout = ParallelLayout(world, tp, rank, moe_tp=moe_tp)
        loaded = load_model_weights(Checkpoint(fp8_checkpoint, config, layout.local_experts(experts)), experts, layout,
                                    keep_fp8=True)
        model, layer = rank_shapes(config, len(experts), layout, np.dtype(np.float32), fp8=True)
        assert {n: (a.shape, a.dtype) for n, a in vars(loaded.layers[0]).items()} == \
            {n: (tuple(s), np.dtype(d)) for n, (s, d) in layer.items()}
        assert loaded.embed.shape == model["embed"][0] and loaded.lm_head.shape == model["lm_head"][0]
