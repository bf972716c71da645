"""Every declared device unit traced by nkipy's real tracer (`NKIPyKernel`, HLO backend); where jax is
also importable, the HLO runs on XLA's CPU backend, one replica per rank, and must equal the NumPy
units run with ranks as threads. Skipped, saying why, where nkipy is absent (CI, any non-Trainium host)."""

import os

import numpy as np
import pytest
from test_nkipy_semantics import LAYOUTS, SHAPES, _copy, _rank_units
from thread_ranks import ThreadCollectives

from kernels import collectives
from minimax_m2.device.step import KV_BLOCK

nkipy_trace = pytest.importorskip("nkipy.core.trace", reason="nkipy is not installed (it needs the Neuron SDK)")

CASES = [(*layout, *shape) for layout in LAYOUTS for shape in SHAPES]


def _trace(unit):
    collectives.set_backend(collectives.NkipyCollectives())
    try:
        return nkipy_trace.NKIPyKernel(unit.fn, "hlo").specialize(**_copy(unit.inputs), **unit.constants)
    finally:
        collectives.set_backend(None)


def _numpy_outputs(world: int, tp: int, moe_tp: int, phase: str, batch: int, seq: int, skewed: bool,
                   **variant) -> list[list]:
    """Per rank, per unit: (user outputs, inputs after the call) of the plain NumPy units."""
    backend = ThreadCollectives(world)

    def body(rank: int):
        results = []
        for unit in _rank_units(world, tp, moe_tp, rank, phase, batch, seq, skewed, **variant):
            inputs = _copy(unit.inputs)
            out = unit.fn(**inputs, **unit.constants)
            results.append((out if isinstance(out, tuple) else (out,), inputs))
        return results

    collectives.set_backend(backend)
    try:
        return backend.run(body)
    finally:
        collectives.set_backend(None)


def _run_on_xla(code, per_rank_inputs: list[dict]) -> list[list[np.ndarray]]:
    """Execute an HloModule with one replica per rank -> [output][rank]."""
    jax = pytest.importorskip("jax", reason="jax runs nkipy's HLO on XLA's CPU backend")
    import jax.extend.backend as jax_backend
    from jax._src.lib import xla_client

    replicas = len(per_rank_inputs)
    backend = jax_backend.get_backend("cpu")
    if len(backend.devices()) < replicas:
        pytest.skip(f"XLA has {len(backend.devices())} CPU devices; "
                    "set XLA_FLAGS=--xla_force_host_platform_device_count=4")
    options = xla_client.CompileOptions()
    options.num_replicas = replicas
    build = options.executable_build_options
    build.num_replicas, build.num_partitions = replicas, 1
    build.device_assignment = xla_client.DeviceAssignment.create(np.arange(replicas).reshape(replicas, 1))
    devices = backend.devices()[:replicas]
    proto = code.to_proto()
    proto.ClearField("input_output_alias")  # XLA:CPU checks aliased layouts; the written caches stay outputs
    module = xla_client._xla.mlir.hlo_to_stablehlo(proto.SerializeToString())
    executable = backend.compile_and_load(module, xla_client.DeviceList(tuple(devices)), options)
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("r",)), jax.sharding.PartitionSpec())
    arguments = []
    for parameter in code.parameters:
        name = parameter.name.split(".must_alias_input")[0]
        shards = [jax.device_put(np.asarray(inputs[name]), d) for inputs, d in zip(per_rank_inputs, devices)]
        arguments.append(jax.make_array_from_single_device_arrays(shards[0].shape, sharding, shards))
    results = executable.execute_sharded(arguments).disassemble_into_single_device_arrays()
    return [[np.asarray(r) for r in output] for output in results]


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30))


@pytest.mark.parametrize("world, tp, moe_tp, phase, batch, seq, skewed", CASES, ids=[
    f"w{c[0]}-tp{c[1]}-moetp{c[2]}-{c[3]}-b{c[4]}-s{c[5]}{'-skewed' if c[6] else ''}" for c in CASES])
def test_traced_units_compute_the_numpy_result(world, tp, moe_tp, phase, batch, seq, skewed) -> None:
    _assert_traced_units_compute_the_numpy_result(world, tp, moe_tp, phase, batch, seq, skewed)


@pytest.mark.parametrize("world, tp", [(1, 1), (2, 1), (4, 2)])
def test_the_lm_head_returning_log_probabilities_computes_the_numpy_result(world, tp) -> None:
    """The lm_head variant that also returns log-probabilities (`kernels.logprobs`), each rank holding a
    vocabulary slice."""
    _assert_traced_units_compute_the_numpy_result(world, tp, 1, "decode", 3, 1, False, logprobs=True)


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 1, 1), (4, 2, 2)])
@pytest.mark.parametrize("phase, batch, seq", [("prefill", 4, 40), ("prefill", 4, 5), ("decode", 3, 1)])
def test_a_spread_step_traced_computes_the_numpy_result(world, tp, moe_tp, phase, batch, seq) -> None:
    """Context parallelism's units (every row's cache striped over the attention groups, queries gathered,
    the parts combined by an all_to_all) through nkipy's tracer."""
    position = 3 * KV_BLOCK + 20 if phase == "prefill" else 5 * KV_BLOCK + 9
    _assert_traced_units_compute_the_numpy_result(world, tp, moe_tp, phase, batch, seq, False, spread=True,
                                                  position=position, max_seq_len=8 * KV_BLOCK)


def _assert_traced_units_compute_the_numpy_result(world: int, tp: int, moe_tp: int, phase: str, batch: int, seq: int,
                                                  skewed: bool, **variant) -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    ranks = [_rank_units(world, tp, moe_tp, r, phase, batch, seq, skewed, **variant) for r in range(world)]
    want = _numpy_outputs(world, tp, moe_tp, phase, batch, seq, skewed, **variant)
    for index, unit in enumerate(ranks[0]):
        code, last = _trace(unit), _trace(ranks[-1][index])
        assert code.to_proto().SerializeToString() == last.to_proto().SerializeToString(), \
            f"{unit.name}: rank 0 and rank {world - 1} trace different HLO"
        # so the NEFF one rank of a host compiles is the one every other rank looks up (minimax_m2.device.warm_up)
        assert code.content_hash("--lnc 1") == last.content_hash("--lnc 1")
        outputs = _run_on_xla(code, [rank_units[index].inputs for rank_units in ranks])
        for rank in range(world):
            user_outputs, written_inputs = want[rank][index]
            for i, expected in enumerate(user_outputs):
                err = _relative(outputs[i][rank], expected)
                assert err <= 1e-5, f"rank {rank} {unit.name} output {i}: traced HLO differs from NumPy by {err:.3g}"
            for output, parameter in code.input_output_alias.items():
                name = code.parameters[parameter].name.split(".must_alias_input")[0]
                err = _relative(outputs[output][rank], written_inputs[name])
                assert err <= 1e-5, f"rank {rank} {unit.name}: {name} written on the device differs by {err:.3g}"


class XlaKernel:
    """Stand-in for nkipy's kernels that traces with nkipy's real tracer: `compile` keeps the traced HLO
    under a name of its content, `load` gives a kernel whose NEFF names are the HLO's parameter and result
    names and which runs the HLO on XLA's CPU backend."""

    traced: dict = {}

    @classmethod
    def compile(cls, fn, *, name: str, build_dir: str, additional_compiler_args: str | None, **kwargs) -> str:
        code = nkipy_trace.NKIPyKernel(fn, "hlo").specialize(**_copy(kwargs))
        path = f"{build_dir}/{name}_{hash(code.to_proto().SerializeToString())}/{name}.neff"
        cls.traced[path] = code
        return path

    @classmethod
    def load(cls, neff_path: str, *, name: str) -> "XlaKernel":
        from test_neuron_runner import Info

        kernel = cls()
        kernel.code = cls.traced[neff_path]
        kernel.input_tensors_info = {p.name: Info(p.shape, str(p.dtype)) for p in kernel.code.parameters}
        kernel.output_tensors_info = {r.name: Info(r.shape, str(r.dtype)) for r in kernel.code.results}
        return kernel

    def __call__(self, inputs: dict, outputs: dict) -> None:
        results = _run_on_xla(self.code, [{k.split(".must_alias_input")[0]: t.numpy() for k, t in inputs.items()}])
        for name, result in zip(self.output_tensors_info, results):
            outputs[name].array[...] = result[0]


def test_neuron_runner_runs_nkipys_traced_units(float32_checkpoint) -> None:
    """The runner's NEFF names and in-place cache writes, against nkipy's traced program run on XLA:CPU."""
    from conftest import PROMPT
    from test_neuron_runner import FakeTensor

    from minimax_m2 import MiniMaxM2Model
    from minimax_m2.device.neuron import NeuronRunner

    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    want_ids, want = model.generate(PROMPT, 4, return_logits=True)
    model.runner = NeuronRunner(runtime=(XlaKernel, FakeTensor, collectives.NkipyCollectives()))
    ids, logits = model.generate(PROMPT, 4, return_logits=True)
    np.testing.assert_array_equal(ids, want_ids)
    assert _relative(logits, want) <= 1e-5


def _xla_runner():
    from test_neuron_runner import FakeTensor

    from minimax_m2.device.neuron import NeuronRunner

    FakeTensor.reset()
    return NeuronRunner(runtime=(XlaKernel, FakeTensor, collectives.NkipyCollectives()))


def test_the_engine_on_nkipys_traced_units_gives_the_numpy_tokens(float32_checkpoint) -> None:
    """Batched, greedy and seeded sampling, a prefix copied from a busy slot: the engine's steps on nkipy's
    traced programs (XLA:CPU) give the NumPy engine's tokens."""
    from test_neuron_runner import run_with_shared_prefix

    from minimax_m2 import MiniMaxM2Model
    from minimax_m2.device.neuron import run_on
    from minimax_m2.serving.engine import Engine

    def run(model) -> list[list[int]]:
        return run_with_shared_prefix(Engine(model, max_num_seqs=4, prefill_chunk=16), first_tokens=8)

    want = run(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64))
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64)
    model.runner = _xla_runner()  # the CPU's expert schedule, as the NumPy engine's: the same program
    assert run(model) == want
    assert run(run_on(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64), _xla_runner())) == want, \
        "the NeuronCore's expert schedule gives the same tokens"


def test_the_device_check_passes_on_nkipys_traced_units() -> None:
    """benchmarks/verify_neuron.py's checks, every program of the shape set traced by nkipy."""
    from minimax_m2 import MiniMaxM2Model
    from minimax_m2.device.neuron import run_on
    from minimax_m2.device.neuron_check import check_device, format_report
    from minimax_m2.run import random_config

    config = random_config(128, 2, 8, 2, 256)
    runner = _xla_runner()
    cpu = MiniMaxM2Model.random(config, seed=3, max_seq_len=64)
    device = run_on(MiniMaxM2Model.random(config, seed=3, max_seq_len=64), runner)
    report = check_device(cpu, device, runner, prompt_len=12, new_tokens=8, batch=2, prefill_chunk=16, tolerance=1e-5)
    assert report["ok"], format_report(report)
