"""The NeuronCore runner's plumbing, with stand-ins for nkipy's DeviceKernel and DeviceTensor that keep
its NEFF naming (nkipy is absent here): same tokens and logits as NumPy, each unit compiled once per
shape, weights and KV caches copied to the device once, cache writes kept on the device."""

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
from conftest import PROMPT

from kernels import DYNAMIC
from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.expert_schedule import runs_numpy
from minimax_m2.device.neuron import WRITTEN, NeuronRunner, run_on
from minimax_m2.device.nkipy_semantics import LoopbackCollectives
from minimax_m2.device.program import TOP_LOGPROBS
from minimax_m2.device.roofline import DECODE_HOST_BYTES_PER_ROW, decode_launches
from minimax_m2.device.stand_in_compiler import StandInCompiler
from minimax_m2.device.step import mask_bucket
from minimax_m2.device.warm_up import deal
from minimax_m2.generation import Sampling
from minimax_m2.serving.engine import Engine
from minimax_m2.serving.verify_gate import VerifyGate


class FakeTensor:
    """DeviceTensor stand-in: the device's copy of an array; counts what crosses to and from the host."""

    uploads: Counter = Counter()  # from_numpy calls by name
    bytes_up = 0
    bytes_down = 0
    copies = 0  # host <-> device copies, either way

    def __init__(self, array: np.ndarray, name: str):
        self.array, self.shape, self.dtype, self.name = array.copy(), array.shape, array.dtype, name

    @classmethod
    def from_numpy(cls, array: np.ndarray, name: str | None = None) -> "FakeTensor":
        cls.uploads[name] += 1
        FakeTensor.bytes_up += array.nbytes
        FakeTensor.copies += 1
        return cls(np.ascontiguousarray(array), name)

    def write_from_numpy(self, array: np.ndarray) -> None:
        assert array.shape == self.shape and array.dtype == self.dtype
        FakeTensor.bytes_up += array.nbytes
        FakeTensor.copies += 1
        self.array[...] = array

    def numpy(self) -> np.ndarray:
        FakeTensor.bytes_down += self.array.nbytes
        FakeTensor.copies += 1
        return self.array.copy()

    @classmethod
    def reset(cls) -> None:
        cls.uploads.clear()
        cls.bytes_up = cls.bytes_down = cls.copies = 0


@dataclass
class Info:
    shape: tuple
    dtype: str


class Watched(np.ndarray):
    """An argument that notes an assignment into it (as nkipy's tracer notes a written input)."""

    wrote = False

    def __setitem__(self, index, value) -> None:
        self.wrote = True
        super().__setitem__(index, value)


class FakeKernel(StandInCompiler):
    """Stand-in for nkipy's kernels (`NkipyKernels`): the stand-in compiler's NEFF names and counts, with
    kernels that run. An argument the unit assigns into is the input '<name>.must_alias_input' and the
    output '<name>'; returned arrays are 'output<i>'. `load` runs the unit as NumPy on copies of the device
    tensors and writes its results into the output tensors."""

    calls: Counter = Counter()
    programs: dict[str, tuple] = {}  # NEFF path -> (fn, arrays, constants)

    def __init__(self, fn, arrays: dict[str, np.ndarray], constants: dict[str, Any]):
        probe = {k: v.copy().view(Watched) for k, v in arrays.items()}
        returned = self._as_tuple(fn(**probe, **constants))
        self.fn, self.constants = fn, constants
        self.written = [k for k in arrays if probe[k].wrote]
        self.input_tensors_info = {k + WRITTEN if k in self.written else k: Info(v.shape, str(v.dtype))
                                   for k, v in arrays.items()}
        self.output_tensors_info = {f"output{i}": Info(r.shape, str(r.dtype)) for i, r in enumerate(returned)}
        self.output_tensors_info.update({k: self.input_tensors_info[k + WRITTEN] for k in self.written})

    @staticmethod
    def _as_tuple(result) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(r).view(np.ndarray) for r in (result if isinstance(result, tuple) else (result,)))

    @classmethod
    def compile(cls, fn, *, name: str, build_dir: str, additional_compiler_args: str | None, **kwargs) -> str:
        path = super().compile(fn, name=name, build_dir=build_dir, additional_compiler_args=additional_compiler_args,
                               **kwargs)
        arrays = {k: v.copy() for k, v in kwargs.items() if isinstance(v, np.ndarray)}  # not the model's arrays
        cls.programs[path] = (fn, arrays, {k: v for k, v in kwargs.items() if k not in arrays})
        return path

    @classmethod
    def load(cls, neff_path: str, *, name: str) -> "FakeKernel":
        fn, arrays, constants = cls.programs[neff_path]
        kernel = cls(fn, arrays, constants)
        kernel.name = name
        return kernel

    def __call__(self, inputs: dict[str, FakeTensor], outputs: dict[str, FakeTensor]) -> None:
        assert set(inputs) == set(self.input_tensors_info) and set(outputs) == set(self.output_tensors_info)
        FakeKernel.calls[self.name] += 1
        for k, t in inputs.items():
            assert t.shape == tuple(self.input_tensors_info[k].shape), k
        args = {k.removesuffix(WRITTEN): t.array.copy() for k, t in inputs.items()}  # on the device: not counted
        for i, r in enumerate(self._as_tuple(self.fn(**args, **self.constants))):
            outputs[f"output{i}"].array[...] = r
        for k in self.written:
            outputs[k].array[...] = args[k]


STAND_INS = (FakeKernel, FakeTensor, LoopbackCollectives())


@pytest.fixture(autouse=True)
def neuron_environment(monkeypatch) -> None:
    for name in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_ROOT_COMM_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def runner(tmp_path) -> NeuronRunner:
    FakeTensor.reset()
    FakeKernel.reset()
    FakeKernel.calls.clear()
    return NeuronRunner(tmp_path / "build", runtime=STAND_INS)


def test_each_rank_takes_its_own_neuron_core(monkeypatch) -> None:
    NeuronRunner(rank=3, runtime=STAND_INS)
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "3"
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "8-11")
    NeuronRunner(rank=3, runtime=STAND_INS)
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "8-11", "a core set by the user is kept"


def test_units_on_the_device_give_the_numpy_tokens_and_logits(float32_checkpoint, runner) -> None:
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    want_ids, want = model.generate(PROMPT, 5, return_logits=True)
    model.runner = runner
    ids, logits = model.generate(PROMPT, 5, return_logits=True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-6 * np.abs(want).max())

    layers = model.config.num_hidden_layers
    assert FakeKernel.compiled == Counter(embedding=2, prefill_layer=1, decode_layer=1, lm_head=2), "once per phase"
    assert FakeTensor.uploads["k_cache"] == FakeTensor.uploads["wq"] == layers, "copied to the device once"
    assert FakeTensor.uploads["h"] == 0, "hidden states never come from the host: they stay on the device"


def _engine(model: MiniMaxM2Model, runner: NeuronRunner) -> Engine:
    """The engine over `model` run by `runner` with a NeuronCore's schedules (static expert blocks, candidates
    by rounds of argmax), as a device runs it: its tokens are compared with the NumPy engine's, which runs
    this CPU's (dynamic expert schedule, candidates by a partial sort)."""
    return Engine(run_on(model, runner), max_num_seqs=4, prefill_chunk=16)


REQUESTS = [([5, 17, 200, 3, 99], Sampling(max_new_tokens=12)),
            ([250, 1, 64, 64, 12, 180, 33, 9], Sampling(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9,
                                                        seed=3)),
            ([7, 7, 7], Sampling(max_new_tokens=12, temperature=1.2, top_k=5, seed=4))]


def test_a_steady_decode_step_moves_only_ids_positions_and_draws(float32_checkpoint, runner) -> None:
    """Once every request decodes, a step copies each row's next id to the host and its position and random
    draw to the device (12 bytes a row, the projection's count), and launches the projection's units."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64)
    engine = _engine(model, runner)
    requests = [engine.submit(prompt, sampling) for prompt, sampling in REQUESTS]
    while not all(r.decoding for r in requests):
        engine.step()
    engine.step()  # the first decode step of this batch uploads its rows
    rows = engine.scheduler.plan().decode[0].input_ids.shape[0]  # 3 requests run in a bucket of 4 rows
    for _ in range(5):
        before = (FakeTensor.bytes_up + FakeTensor.bytes_down, runner.launches)
        engine.step()
        moved = FakeTensor.bytes_up + FakeTensor.bytes_down - before[0]
        assert moved <= DECODE_HOST_BYTES_PER_ROW * 4 * rows and moved / rows <= 64, f"{moved} bytes for {rows} rows"
        assert moved == DECODE_HOST_BYTES_PER_ROW * rows
        assert runner.launches - before[1] == decode_launches(model.config.num_hidden_layers)


def test_log_probabilities_come_from_the_device_without_the_logits(float32_checkpoint, runner) -> None:
    """Rows that want log-probabilities (greedy and sampled on the device) get them from the device: a steady
    decode step moves each row's chosen one and the TOP_LOGPROBS largest with their ids beside the id,
    position and draw (never the logits), and they equal the NumPy engine's."""
    prompts = [[5, 17, 200, 3, 99], [7, 7, 7]]
    sampling = [Sampling(max_new_tokens=8, logprobs=5),
                Sampling(max_new_tokens=8, temperature=0.8, top_k=20, seed=3, logprobs=2)]
    want = Engine(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64), max_num_seqs=4,
                  prefill_chunk=16).generate(prompts, sampling)
    engine = _engine(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64), runner)
    requests = [engine.submit(prompt, s) for prompt, s in zip(prompts, sampling)]
    while not all(r.decoding for r in requests):
        engine.step()
    engine.step()
    rows = engine.scheduler.plan().decode[0].input_ids.shape[0]
    before = FakeTensor.bytes_up + FakeTensor.bytes_down
    engine.step()
    moved = FakeTensor.bytes_up + FakeTensor.bytes_down - before
    assert moved == (DECODE_HOST_BYTES_PER_ROW + 4 + 8 * TOP_LOGPROBS) * rows, f"{moved} bytes for {rows} rows"
    while not engine.idle():
        engine.step()
    for request, alone in zip(requests, want):
        assert request.generated == alone.generated and len(request.logprobs) == 8
        for (logprob, top), (want_logprob, want_top) in zip(request.logprobs, alone.logprobs):
            assert [i for i, _ in top] == [i for i, _ in want_top]
            assert np.allclose([logprob] + [v for _, v in top], [want_logprob] + [v for _, v in want_top], atol=1e-5)


SHARED = list(range(1, 41))  # a prefix that a second request copies from the first's busy slot


def run_with_shared_prefix(engine: Engine, first_tokens: int = 12) -> list[list[int]]:
    """A first request decoding while a second copies its prefix from the busy slot and REQUESTS run
    batched beside them -> every request's tokens."""
    first = engine.submit(SHARED, Sampling(max_new_tokens=first_tokens))
    while not first.decoding:
        engine.step()
    results = engine.generate([SHARED + [50, 51]] + [p for p, _ in REQUESTS],
                              [Sampling(max_new_tokens=6)] + [s for _, s in REQUESTS])
    while first.finish_reason is None:
        engine.step()
    return [first.generated] + [r.generated for r in results]


def test_tokens_equal_the_numpy_engine_greedy_and_sampled(float32_checkpoint, runner) -> None:
    want = run_with_shared_prefix(Engine(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64),
                                         max_num_seqs=4, prefill_chunk=16))
    got = run_with_shared_prefix(_engine(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64), runner))
    assert got == want
    assert FakeKernel.calls["copy_block"] > 0, "the busy request's partial block was copied on the device"


def test_warm_up_compiles_every_shape_and_serving_compiles_nothing(with_tokenizer, runner) -> None:
    from tokenizers import Tokenizer

    from minimax_m2.serving import grammars
    from minimax_m2.serving.constraint import Grammars

    model = MiniMaxM2Model.from_pretrained(with_tokenizer, max_seq_len=64)
    engine = _engine(model, runner)
    steps = engine.warm_up(every_shape=True)
    prefills = sum(phase == "prefill" for phase, *_ in engine.shapes.shapes())
    decodes = len(engine.shapes.shapes()) - prefills
    # decode: greedy or sampling x logits or not, and log-probabilities; a prefill always may sample: plain,
    # with logits, with log-probabilities, with every position's logits; and once per lm_head shape (rows of
    # a decode), each sampling variant with grammar masks of each bucket up to the rows (a prefill's constrained
    # rows choose on the host)
    heads = {max(rows, 2) for phase, rows, *_ in engine.shapes.shapes() if phase == "decode"}
    masked = sum(3 * len({mask_bucket(count, rows) for count in range(1, rows + 1)}) for rows in heads)
    assert steps == 5 * decodes + 4 * prefills + masked, "each shape with each lm_head variant"
    compiled = runner.compiled
    assert compiled == len(engine.programs()), "the compile set the engine reports is what the device compiled"
    runner.frozen = True
    shared = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] * 3  # a prefix block a busy request holds is copied (copy_block)
    engine.generate([p for p, _ in REQUESTS] + [shared, shared + [13]], [s for _, s in REQUESTS] + [Sampling()] * 2)
    engine.generate([[3, 4, 5]], Sampling(logprobs=2))  # greedy rows alone, with log-probabilities
    held = Grammars(Tokenizer.from_file(str(with_tokenizer / "tokenizer.json")), model.config.vocab_size, ())
    matcher = held.compile(grammars.json_answer(None))
    constrained = [engine.submit(p, s, constraint=held.constraint(matcher, False)) for p, s in REQUESTS]
    while not engine.idle():
        engine.step()
    assert all(r.generated for r in constrained) and held.stats["masked_rows"] > 0
    assert engine.stats["reused_tokens"] > 0 and FakeKernel.compiled["copy_block"] == 1
    assert runner.compiled == compiled, "a shape outside the warmed-up set was compiled while serving"
    with pytest.raises(RuntimeError, match="outside the compiled set"):
        model.forward(np.zeros((5, 3), np.int64))


def test_a_new_cache_replaces_the_old_on_the_device(float32_checkpoint, runner) -> None:
    """A second generation reuses the device's caches (its rows are simply written again); a cache
    allocated anew replaces the old one on the device, which is released."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    model.runner = runner
    first = model.generate(PROMPT, 3, return_logits=True)
    again = model.generate(PROMPT, 3, return_logits=True)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    layers = model.config.num_hidden_layers
    assert FakeTensor.uploads["k_cache"] == layers
    model.allocate(4)
    third = model.generate(PROMPT, 3, return_logits=True)
    np.testing.assert_array_equal(first[1], third[1])
    assert FakeTensor.uploads["k_cache"] == 2 * layers
    on_device = Counter(t.name for t in runner._resident.values())
    assert on_device["k_cache"] == on_device["v_cache"] == layers, "the first caches were released"


def test_missing_runtime_is_named() -> None:
    try:
        import nkipy.runtime  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs nkipy"):
            NeuronRunner()
    else:
        pytest.skip("nkipy is installed")


def test_fp8_weights_reach_the_device_as_int8_bytes(fp8_checkpoint, runner) -> None:
    """An FP8 checkpoint kept as codes: the device holds its experts as int8 tensors of the stored bytes
    (half the bf16 bytes), and the engine gives the tokens of the NumPy engine."""
    def load() -> MiniMaxM2Model:
        return MiniMaxM2Model.from_pretrained(fp8_checkpoint, max_seq_len=64, keep_fp8=True)

    want = [r.generated for r in Engine(load(), max_num_seqs=4, prefill_chunk=16).generate(
        [p for p, _ in REQUESTS], [s for _, s in REQUESTS])]
    model = load()
    got = [r.generated for r in _engine(model, runner).generate([p for p, _ in REQUESTS], [s for _, s in REQUESTS])]
    assert got == want
    held = [t for t in runner._resident.values() if t.name in ("w13", "w2")]
    assert len(held) == 2 * len(model.weights.layers) and all(t.array.dtype == np.int8 for t in held)
    assert any(t.array.tobytes() == model.weights.layers[0].w13.tobytes() for t in held)


def test_the_compile_set_is_spread_over_the_hosts_ranks(float32_checkpoint, tmp_path) -> None:
    """64 ranks as threads share a build directory: each compiles its share of the engine's programs (no
    rank more than ceil(programs / 64) + 1, 1 s a compile), every distinct program is compiled once, the
    warm-up takes about programs / 64 compiles; every rank then loads every program without compiling, and
    a restart on the same directory compiles nothing."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64)
    units = list(Engine(model, max_num_seqs=4, prefill_chunk=16).programs().values())
    ranks, build = 64, tmp_path / "build"
    FakeKernel.reset()

    def start(seconds: float) -> tuple[list[int], float]:
        FakeKernel.compile_seconds = seconds
        runners = [NeuronRunner(build, runtime=STAND_INS) for _ in range(ranks)]
        began = time.perf_counter()
        with ThreadPoolExecutor(ranks) as pool:
            shares = list(pool.map(lambda r: len(runners[r].prepare(units, r, ranks)), range(ranks)))
        return shares, time.perf_counter() - began

    try:
        shares, seconds = start(1.0)
    finally:
        FakeKernel.compile_seconds = 0.0
    assert sum(shares) == len(units) == sum(FakeKernel.compiled.values())
    assert max(FakeKernel.by_thread.values()) <= -(-len(units) // ranks) + 1
    assert seconds <= len(units) / ranks + 5
    loader = NeuronRunner(build, runtime=STAND_INS)
    for unit in units:
        loader._compile(unit.key(), unit)
    assert loader.compiled == len(units) and sum(FakeKernel.compiled.values()) == len(units), "loading compiled"
    start(0.0)
    assert sum(FakeKernel.compiled.values()) == len(units), "a restart on the same build directory compiled"


def test_programs_are_dealt_largest_first_and_evenly() -> None:
    """298 programs of mixed sizes over 64 ranks: each dealt once, no rank more than ceil(298 / 64) + 1,
    the largest programs on different ranks, and the heaviest rank within one largest program of the
    lightest."""
    weights = [1000] * 40 + [300] * 100 + [1] * 158
    shares = deal(weights, 64)
    assert sorted(i for share in shares for i in share) == list(range(len(weights)))
    assert max(map(len, shares)) <= -(-len(weights) // 64) + 1
    assert all(sum(weights[i] == 1000 for i in share) <= 1 for share in shares)
    loads = [sum(weights[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= 1000


@pytest.mark.parametrize("jobs", [1, 3], ids=["one-process", "three-processes"])
def test_ahead_of_time_compile_leaves_a_start_nothing_to_compile(float32_checkpoint, tmp_path, jobs, capsys) -> None:
    """--mode compile traces and compiles the run's programs into a build directory (no NeuronCore), in one
    process or several at once, each program once; a start on it with the same flags, its engine warmed up
    on every shape, compiles nothing more."""
    import run_example
    from minimax_m2.plan_mode import run_compile

    build = tmp_path / "build"
    flags = ["--checkpoint", str(float32_checkpoint), "--max-seq-len", "64", "--max-num-seqs", "4", "--prefill-chunk",
             "16", "--kv-blocks", "8", "--build-dir", str(build), "--compile-jobs", str(jobs)]
    args = run_example.parse_args(["--mode", "compile", *flags])
    args.device, args.dtype, args.fp8 = "neuron", "bfloat16", "dequantize"  # as main() resolves them
    FakeKernel.compiled.clear()
    assert run_compile(args, runtime=STAND_INS) == 0
    ahead = len(list(build.glob("*/*.neff")))
    assert f"compiled {ahead} programs into {build}" in capsys.readouterr().out
    assert sum(FakeKernel.compiled.values()) == (ahead if jobs == 1 else 0), "the forked processes compiled them"
    model = run_on(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64, dtype="bfloat16"),
                   NeuronRunner(build, runtime=STAND_INS))
    engine = Engine(model, max_num_seqs=4, prefill_chunk=16, kv_blocks=8, keep_logits=False)
    assert ahead == len(engine.programs()) > 0
    before = sum(FakeKernel.compiled.values())
    assert engine.warm_up(every_shape=True) > 0 and model.runner.compiled == ahead
    assert sum(FakeKernel.compiled.values()) == before, "the start compiled what was compiled ahead of time"


def test_a_program_this_rank_compiled_is_loaded_without_tracing_it_again(float32_checkpoint, runner) -> None:
    """A rank's share is traced once, to compile it; the programs of other ranks' shares are traced when
    loaded, to find their NEFFs."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64)
    units = list(Engine(model, max_num_seqs=4, prefill_chunk=16).programs().values())
    FakeKernel.traces = 0
    share = runner.prepare(units, 0, 2)
    assert FakeKernel.traces == len(share) < len(units)
    for unit in units:
        runner._compile(unit.key(), unit)
    assert FakeKernel.traces == len(units)


def test_constrained_rows_carry_their_masks_and_nothing_else(with_tokenizer, runner) -> None:
    """A steady decode step whose rows are two constrained requests and a free one moves, beside each row's id,
    position and draw, the step's masks (M = 2 rows of ceil(V / 32) words: V / 8 bytes a constrained row) when
    they changed; the rows' mask index (4 bytes a row) only when the constrained rows changed."""
    from tokenizers import Tokenizer

    from minimax_m2.serving import grammars
    from minimax_m2.serving.constraint import Grammars

    model = MiniMaxM2Model.from_pretrained(with_tokenizer, max_seq_len=64)
    engine = _engine(model, runner)
    held = Grammars(Tokenizer.from_file(str(with_tokenizer / "tokenizer.json")), model.config.vocab_size, ())
    matcher = held.compile(grammars.json_answer({"type": "array", "items": {"type": "string"}}))
    requests = [engine.submit(prompt, replace(sampling, max_new_tokens=30),
                              constraint=held.constraint(matcher, False) if i < 2 else None)
                for i, (prompt, sampling) in enumerate(REQUESTS)]
    while not all(r.decoding for r in requests):
        engine.step()
    engine.step()
    rows = engine.scheduler.plan().decode[0].input_ids.shape[0]
    mask_bytes = 2 * -(-model.config.vocab_size // 32) * 4
    seen = set()
    for _ in range(5):
        before = FakeTensor.bytes_up + FakeTensor.bytes_down
        engine.step()
        moved = FakeTensor.bytes_up + FakeTensor.bytes_down - before
        assert moved in (DECODE_HOST_BYTES_PER_ROW * rows, DECODE_HOST_BYTES_PER_ROW * rows + mask_bytes), moved
        seen.add(moved)
    assert DECODE_HOST_BYTES_PER_ROW * rows + mask_bytes in seen, "the masks travel when they change"


def test_verify_steps_are_in_the_warmed_up_set(float32_checkpoint, runner) -> None:
    """With speculation, the warm-up compiles the verify steps (a prefill's shape over the decode rows, every
    position's ids, sampled rows drawn on the device with a draw a position); serving with drafts then
    compiles nothing and gives the NumPy engine's tokens."""
    prompts = [[9, 8, 7, 6] * 4, [3, 1, 4, 1, 5]]
    settings = [Sampling(max_new_tokens=20), Sampling(max_new_tokens=20, temperature=0.8, top_k=5, seed=2)]
    want = Engine(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64), max_num_seqs=4,
                  prefill_chunk=16, speculative=3).generate(prompts, settings)
    model = run_on(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64), runner)
    engine = Engine(model, max_num_seqs=4, prefill_chunk=16, speculative=3, verify_gate=VerifyGate(always=True))
    engine.warm_up(every_shape=True)
    assert any(phase == "verify" for phase, *_ in engine.shapes.shapes())
    compiled = runner.compiled
    runner.frozen = True
    got = engine.generate(prompts, settings)
    assert [r.generated for r in got] == [r.generated for r in want]
    assert engine.stats["verify_steps"] > 0 and runner.compiled == compiled


def test_a_device_runner_never_gets_a_schedule_only_numpy_runs(float32_checkpoint, runner) -> None:
    """Costs measured on this CPU (where NumPy-only schedules are allowed), then a device runner: every program
    the engine compiles has a compiled target's constants (no DYNAMIC experts, no host attention, no partial
    sort), and its shapes are a compiled set."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=64)
    assert runs_numpy(model.schedule_cost()) and model.on_cpu
    model.runner = runner
    assert not runs_numpy(model.schedule_cost()) and not model.on_cpu
    engine = Engine(model, max_num_seqs=4, prefill_chunk=16)
    assert engine.shapes.compiled
    layers = [u.constants for u in engine.programs().values() if u.name.endswith("_layer")]
    heads = [u.constants for u in engine.programs().values() if u.name == "lm_head"]
    assert layers and not any(c["host_schedule"] or c["block_rows"] == DYNAMIC for c in layers)
    assert heads and not any(c["partial_sort"] for c in heads)
