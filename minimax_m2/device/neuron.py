"""Running the declared units on a NeuronCore with nkipy's runtime (Trainium hosts only).

Each unit is traced, hashed and compiled once per shape and constants by nkipy (`NkipyKernels`: the two
halves of `DeviceKernel.compile_and_load`), into a build directory the host's ranks share, where a NEFF is
named by the hash of its program and compiler arguments: before the warm-up each rank compiles its share of
the compile set (`prepare`, dealt by `minimax_m2.device.warm_up`), and after a barrier every rank finds all
of them compiled and loads them; a restart on the same directory compiles nothing. nkipy's in-kernel
collectives run inside the programs. What crosses
between host and device:

- arrays that live as long as the model (weights, RoPE tables, rank values, KV caches): copied once; a KV
  cache is passed as its own output, so the unit's write lands in place;
- unit outputs (hidden states, next token ids, logits): kept on the device as `DeviceArray`s and passed to
  the next unit as they are; copied to the host only when read (the ids every step, the logits only when
  a step asks for them). Each kernel writes its outputs into two sets of buffers in turn (double
  buffering), so an output stays valid while the next call of the same kernel runs;
- the step's small arrays (positions, cache rows, validity, the MoE union, sampling settings, the random
  draw): written in place into one device buffer per argument (`write_from_numpy`), and only when their
  contents changed. An array whose contents a read-back output already holds on the device (the ids a
  decode step feeds back) is bound to that output: no copy at all.

FP8 weights travel as their bytes, declared int8 (nkipy's `DeviceTensor` has no float8_e4m3fn, and a
NeuronCore's FP8 E4M3 reads some e4m3fn bytes as infinities): the units decode them exactly
(`kernels.fp8`).

A steady decode step thus copies each row's new token id to the host, and its position and random draw to
the device: 12 bytes per row (tests/test_neuron_runner.py counts them).

NOT RUN ON HARDWARE: this follows nkipy's API (commit b91c980: NEFF input names are the argument names,
`.must_alias_input` marking written ones; outputs `output<i>` and written inputs by name;
`DeviceTensor.from_numpy`, `.numpy()`, `.write_from_numpy`), checked here only with stand-ins for
DeviceKernel and DeviceTensor. nkipy's runtime runs kernels synchronously, so reading a step's ids cannot
overlap the next step until its asynchronous execution lands.
"""

import contextlib
import multiprocessing
import os
import time
import weakref
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from kernels import collectives
from minimax_m2.device.program import Unit
from minimax_m2.device.roofline import TRN2, expert_cost
from minimax_m2.device.warm_up import deal, program_weight
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.weights.model_weights import LAYER_WEIGHT_NAMES

WRITTEN = ".must_alias_input"  # nkipy's suffix on the NEFF input name of an argument the unit writes
RESIDENT = LAYER_WEIGHT_NAMES + ("embed", "final_norm", "lm_head", "cos_table", "sin_table", "k_cache", "v_cache",
                                 "member_slots", "own_members", "own_position", "vocab_offset", "embed_offset")


def run_on(model: MiniMaxM2Model, runner: "NeuronRunner | None") -> MiniMaxM2Model:
    """The model run by `runner` (None: NumPy on this CPU, unchanged), with the expert schedule a
    NeuronCore's costs choose rather than this CPU's."""
    if runner is not None:
        model.runner, model.expert_cost = runner, expert_cost(TRN2, model.weights.layers[0])
    return model


class NkipyKernels:
    """nkipy's `DeviceKernel.compile_and_load` in its two halves (nkipy b91c980, runtime/device_kernel.py),
    so that one rank of a host compiles a program and every rank loads it."""

    @staticmethod
    def compile(fn: Any, *, name: str, build_dir: str, additional_compiler_args: str | None, **kwargs: Any) -> str:
        """Trace fn with these example arguments, hash the program with the compiler arguments, and compile
        it to `{build_dir}/{name}_{hash}/{name}.neff` unless that file is there -> its path."""
        from nkipy.core.compile import CompilationTarget
        from nkipy.runtime import DeviceKernel

        neff_path, _ = DeviceKernel._trace_and_compile(
            fn, name, (), kwargs, additional_compiler_args=additional_compiler_args, use_cached_if_exists=True,
            build_dir=build_dir, target=CompilationTarget.DEFAULT)
        return neff_path

    @staticmethod
    def load(neff_path: str, *, name: str) -> Any:
        """The NEFF loaded on this rank's NeuronCore, its collectives over every torch.distributed rank."""
        import torch.distributed as dist
        from nkipy.runtime import DeviceKernel

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return DeviceKernel.load_from_neff(neff_path, name=name, cc_enabled=True, rank_id=dist.get_rank(),
                                               world_size=dist.get_world_size())
        return DeviceKernel.load_from_neff(neff_path, name=name)


def nkipy_runtime() -> tuple[Any, Any, collectives.Backend]:
    """nkipy's (kernels: compile and load, DeviceTensor, in-kernel collectives)."""
    try:
        from nkipy.runtime import DeviceTensor
    except ImportError as err:
        raise ImportError("running on NeuronCores (--device neuron) or compiling for them (--mode compile) needs "
                          "nkipy and the Neuron SDK (its compiler; its runtime, spike, to run), installed on "
                          "Trainium hosts") from err
    return NkipyKernels, DeviceTensor, collectives.NkipyCollectives()


def _device_view(array: np.ndarray) -> np.ndarray:
    """The array as the device holds it: FP8 codes (uint8 on the host) as int8, the same bytes."""
    return array.view(np.int8) if array.dtype == np.uint8 else array


def _numpy_dtype(name: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)


class DeviceArray:
    """A unit's output on the device: the next unit takes it as it is; the host reads it (np.asarray) only
    when it needs the values."""

    def __init__(self, tensor: Any, runner: "NeuronRunner"):
        self.tensor, self.runner = tensor, runner
        self.shape, self.dtype = tuple(tensor.shape), _numpy_dtype(tensor.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self.runner.read(self)
        return values if dtype is None else values.astype(dtype)


def _content(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, array.tobytes()


class NeuronRunner:
    """Runs a `Unit` on this rank's NeuronCore: `runner(unit)` returns what `unit.fn` returns, as
    `DeviceArray`s. Counts launches and the bytes copied each way (`uploaded`, `downloaded`)."""

    compiles = True  # every unit it runs is a compiled program (`MiniMaxM2Model.compiles`)

    def __init__(self, build_dir: str | Path = "build/neuron", rank: int = 0, compiler_args: str | None = None,
                 runtime: tuple[Any, Any, collectives.Backend] | None = None):
        """rank: this process's rank, which gets NeuronCore `rank` (as nkipy's examples do, unless
        NEURON_RT_VISIBLE_CORES is set); runtime: (kernels with `compile` and `load` as `NkipyKernels`,
        DeviceTensor, the collectives backend units are traced with), nkipy's by default. Create it before
        the Neuron runtime starts."""
        os.environ.setdefault("NEURON_RT_VISIBLE_CORES", str(rank))
        os.environ.setdefault("NEURON_RT_ROOT_COMM_ID", "localhost:61239")
        self._kernel_type, self._tensor_type, self._traced_collectives = runtime or nkipy_runtime()
        self.build_dir = str(build_dir)
        self.compiler_args = compiler_args
        self._kernels: dict[tuple, Any] = {}
        self._neffs: dict[tuple, str] = {}  # NEFF paths of the units this rank compiled, by key, until loaded
        self._outputs: dict[tuple, list[dict[str, Any]]] = {}  # two buffer sets per kernel, used in turn
        self._turn: dict[tuple, int] = {}
        self._resident: dict[int, Any] = {}
        self._staged: dict[str, tuple[tuple, Any]] = {}  # argument name -> (contents, its device buffer)
        self._on_device: dict[tuple, Any] = {}  # contents -> a device tensor holding them (read back or staged)
        self.frozen = False  # once warmed up, a unit of a new shape is refused, never compiled while serving
        self.launches = 0
        self.uploaded = 0
        self.downloaded = 0

    @property
    def compiled(self) -> int:
        """Programs compiled (and loaded) so far: one per unit shape."""
        return len(self._kernels)

    def __call__(self, unit: Unit) -> Any:
        key = unit.key()
        kernel = self._kernels.get(key) or self._compile(key, unit)
        turn = self._turn[key] = 1 - self._turn.get(key, 1)
        outputs = dict(self._outputs[key][turn])
        self._forget(outputs.values())
        inputs = {name: self._bind(name.removesuffix(WRITTEN), unit.inputs[name.removesuffix(WRITTEN)])
                  for name in kernel.input_tensors_info}
        outputs.update({name: inputs[name + WRITTEN]
                        for name in kernel.output_tensors_info if name + WRITTEN in inputs})
        kernel(inputs=inputs, outputs=outputs)
        self.launches += 1
        count = len(self._outputs[key][turn])
        results = tuple(DeviceArray(self._outputs[key][turn][f"output{i}"], self) for i in range(count))
        return results[0] if len(results) == 1 else results

    def read(self, array: DeviceArray) -> np.ndarray:
        """The host's copy of a device output (and a note that the device holds these contents)."""
        values = array.tensor.numpy()
        self.downloaded += values.nbytes
        self._on_device[_content(values)] = array.tensor
        return values

    def prepare(self, units: list[Unit], rank: int, ranks: int) -> list[tuple[Unit, float]]:
        """Compile this rank's share of `units` (rank `rank` of the `ranks` sharing the build directory, as
        `minimax_m2.device.warm_up.deal` gives it) -> each unit of the share with the seconds it took
        (tracing, and compiling unless its NEFF was there). Once every rank of the host has prepared, each
        finds every unit compiled when it first runs it."""
        share = deal([program_weight(u) for u in units], ranks)[rank]
        timed = []
        for index in share:
            start = time.perf_counter()
            self._neffs[units[index].key()] = self._build(units[index])
            timed.append((units[index], time.perf_counter() - start))
        return timed

    def _build(self, unit: Unit) -> str:
        """The unit traced with its example inputs and compiled (unless its NEFF is in the build directory)
        -> the NEFF's path."""
        example = {name: _device_view(np.asarray(value)) for name, value in unit.inputs.items()}
        previous = collectives.set_backend(self._traced_collectives)
        try:
            return self._kernel_type.compile(unit.fn, name=unit.name, build_dir=self.build_dir,
                                             additional_compiler_args=self.compiler_args, **example, **unit.constants)
        finally:
            collectives.set_backend(previous)

    def _compile(self, key: tuple, unit: Unit) -> Any:
        if self.frozen:
            shapes = ", ".join(f"{name} {list(shape)}" for name, shape, _ in key[1][:4])
            raise RuntimeError(f"{unit.name} was called with a shape outside the compiled set ({shapes}, ...): "
                               "refused rather than compiled while serving")
        neff = self._neffs.pop(key, None) or self._build(unit)  # this rank's share is traced once
        kernel = self._kernel_type.load(neff, name=unit.name)
        written = {name.removesuffix(WRITTEN) for name in kernel.input_tensors_info if name.endswith(WRITTEN)}
        self._outputs[key] = [
            {name: self._tensor_type.from_numpy(np.zeros(tuple(info.shape), _numpy_dtype(info.dtype)),
                                                f"{unit.name}.{name}.{turn}")
             for name, info in kernel.output_tensors_info.items() if name not in written}
            for turn in (0, 1)
        ]
        self._kernels[key] = kernel
        return kernel

    def _forget(self, tensors: Any) -> None:
        """These device tensors are about to be overwritten: contents noted for them no longer hold."""
        gone = {id(t) for t in tensors}
        self._on_device = {c: t for c, t in self._on_device.items() if id(t) not in gone}

    def _upload(self, array: np.ndarray, name: str) -> Any:
        self.uploaded += array.nbytes
        return self._tensor_type.from_numpy(_device_view(np.ascontiguousarray(array)), name)

    def _bind(self, name: str, value: Any) -> Any:
        """The device tensor to pass for argument `name`."""
        if isinstance(value, DeviceArray):
            return value.tensor
        if name in RESIDENT:  # as long as the model: copied once, released with the array
            tensor = self._resident.get(id(value))
            if tensor is None:
                tensor = self._resident[id(value)] = self._upload(value, name)
                weakref.finalize(value, self._resident.pop, id(value), None)
            return tensor
        array = np.ascontiguousarray(value)
        content = _content(array)
        held = self._on_device.get(content)
        if held is not None:
            return held
        staged = self._staged.get(name)
        if staged is not None and staged[0][:2] == content[:2]:
            self._forget([staged[1]])
            staged[1].write_from_numpy(array)
            self.uploaded += array.nbytes
            tensor = staged[1]
        else:
            tensor = self._upload(array, name)
        self._staged[name] = (content, tensor)
        self._on_device[content] = tensor
        return tensor


def compile_share(runner: NeuronRunner, units: list[Unit], world_groups: collectives.ReplicaGroups
                  ) -> tuple[list[tuple[Unit, float]], int]:
    """This rank compiles its share of `units` into the build directory the host's ranks share (torchrun's
    LOCAL_RANK of LOCAL_WORLD_SIZE), then waits for every rank of `world_groups`, after which each finds all
    of them compiled and only loads them -> (its share with the seconds each took, the host's ranks)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    timed = runner.prepare(units, int(os.environ.get("LOCAL_RANK", "0")), ranks)
    collectives.all_gather(np.zeros(2, np.int32), 0, world_groups)  # a barrier: every share is compiled
    return timed, ranks


_AHEAD: dict[str, Any] = {}  # what `compile_ahead`'s workers compile (set before they are forked) and their runner


def compile_ahead(units: list[Unit], build_dir: str | Path, jobs: int, compiler_args: str | None = None,
                  runtime: tuple[Any, Any, collectives.Backend] | None = None) -> list[tuple[Unit, float]]:
    """Every unit traced and compiled into `build_dir` (one whose NEFF is there only traced) by `jobs`
    processes at once (forked from this one, which holds the units; this process alone when jobs is 1), the
    largest programs first, each to the next free process, with a bar -> each unit with its seconds."""
    order = sorted(range(len(units)), key=lambda i: -program_weight(units[i]))
    _AHEAD.update(units=units, build_dir=str(build_dir), compiler_args=compiler_args, runtime=runtime)
    try:
        with multiprocessing.get_context("fork").Pool(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
            done = pool.imap_unordered(_compile_one, order) if pool else map(_compile_one, order)
            seconds = dict(tqdm(done, total=len(units), desc="compiling", unit="program"))
    finally:
        _AHEAD.clear()
    return [(units[i], seconds[i]) for i in range(len(units))]


def _compile_one(index: int) -> tuple[int, float]:
    """(index, seconds) of compiling `_AHEAD`'s unit `index` with this process's runner."""
    if "runner" not in _AHEAD:
        _AHEAD["runner"] = NeuronRunner(_AHEAD["build_dir"], compiler_args=_AHEAD["compiler_args"],
                                        runtime=_AHEAD["runtime"])
    start = time.perf_counter()
    _AHEAD["runner"]._build(_AHEAD["units"][index])
    return index, time.perf_counter() - start
