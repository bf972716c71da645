"""Running the declared units on a NeuronCore with nkipy's runtime (Trainium hosts only).

Each unit is compiled once per shape and constants by `nkipy.runtime.DeviceKernel.compile_and_load`
(rank 0 traces and compiles, every rank loads the NEFF), with nkipy's in-kernel collectives. Arrays
that live as long as the model (weights, RoPE tables, rank values, KV caches) are copied to the
device once and stay there; a KV cache is passed as its own output, so the unit's write lands in
place. Per-call arrays (hidden states, token ids, positions, the MoE union) are copied in and the
results copied out on every call.

NOT RUN ON HARDWARE: this follows nkipy's API (commit b91c980: NEFF input names are the argument
names, `.must_alias_input` marking written ones; outputs `output<i>` and written inputs by name),
checked here only with stand-ins for DeviceKernel and DeviceTensor (tests/test_neuron_runner.py).
"""

import os
import weakref
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from kernels import collectives
from minimax_m2.program import Unit
from minimax_m2.weights import LAYER_WEIGHT_NAMES

WRITTEN = ".must_alias_input"  # nkipy's suffix on the NEFF input name of an argument the unit writes
RESIDENT = LAYER_WEIGHT_NAMES + ("embed", "final_norm", "lm_head", "cos_table", "sin_table", "k_cache", "v_cache",
                                 "member_slots", "own_members", "own_position", "vocab_offset")


def nkipy_runtime() -> tuple[Any, Any, collectives.Backend]:
    """nkipy's (DeviceKernel, DeviceTensor, in-kernel collectives)."""
    try:
        from nkipy.runtime import DeviceKernel, DeviceTensor
    except ImportError as err:
        raise ImportError("--device neuron needs nkipy and the Neuron runtime (spike), installed on Trainium hosts "
                          "with the Neuron SDK") from err
    return DeviceKernel, DeviceTensor, collectives.NkipyCollectives()


def _numpy_dtype(name: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)


class NeuronRunner:
    """Runs a `Unit` on this rank's NeuronCore: `runner(unit)` returns what `unit.fn` returns, as NumPy."""

    def __init__(self, build_dir: str | Path = "build/neuron", rank: int = 0, compiler_args: str | None = None,
                 runtime: tuple[Any, Any, collectives.Backend] | None = None):
        """rank: this process's rank, which gets NeuronCore `rank` (as nkipy's examples do, unless
        NEURON_RT_VISIBLE_CORES is set); runtime: (DeviceKernel, DeviceTensor, the collectives backend
        units are traced with), nkipy's by default. Create it before the Neuron runtime starts."""
        os.environ.setdefault("NEURON_RT_VISIBLE_CORES", str(rank))
        os.environ.setdefault("NEURON_RT_ROOT_COMM_ID", "localhost:61239")
        self._kernel_type, self._tensor_type, self._traced_collectives = runtime or nkipy_runtime()
        self.build_dir = str(build_dir)
        self.compiler_args = compiler_args
        self._kernels: dict[tuple, Any] = {}
        self.frozen = False  # once warmed up, a unit of a new shape is refused, never compiled while serving
        self._outputs: dict[tuple, dict[str, Any]] = {}
        self._resident: dict[int, Any] = {}

    @property
    def compiled(self) -> int:
        """Programs compiled (and loaded) so far: one per unit shape."""
        return len(self._kernels)

    def __call__(self, unit: Unit) -> Any:
        key = self._key(unit)
        kernel = self._kernels.get(key) or self._compile(key, unit)
        inputs = {name: self._on_device(name.removesuffix(WRITTEN), unit.inputs[name.removesuffix(WRITTEN)])
                  for name in kernel.input_tensors_info}
        outputs = dict(self._outputs[key])
        outputs.update({name: inputs[name + WRITTEN] for name in kernel.output_tensors_info if name + WRITTEN in inputs})
        kernel(inputs=inputs, outputs=outputs)
        results = tuple(self._outputs[key][f"output{i}"].numpy() for i in range(len(self._outputs[key])))
        return results[0] if len(results) == 1 else results

    @staticmethod
    def _key(unit: Unit) -> tuple:
        shapes = tuple((name, a.shape, str(a.dtype)) for name, a in unit.inputs.items())
        return unit.name, shapes, repr(sorted(unit.constants.items()))

    def _compile(self, key: tuple, unit: Unit) -> Any:
        if self.frozen:
            shapes = ", ".join(f"{name} {list(shape)}" for name, shape, _ in key[1][:4])
            raise RuntimeError(f"{unit.name} was called with a shape outside the compiled set ({shapes}, ...): "
                               "refused rather than compiled while serving")
        previous = collectives.set_backend(self._traced_collectives)
        try:
            kernel = self._kernel_type.compile_and_load(
                unit.fn, name=unit.name, build_dir=self.build_dir, additional_compiler_args=self.compiler_args,
                **unit.inputs, **unit.constants,
            )
        finally:
            collectives.set_backend(previous)
        written = {name.removesuffix(WRITTEN) for name in kernel.input_tensors_info if name.endswith(WRITTEN)}
        self._outputs[key] = {
            name: self._tensor_type.from_numpy(np.zeros(tuple(info.shape), _numpy_dtype(info.dtype)), f"{unit.name}.{name}")
            for name, info in kernel.output_tensors_info.items() if name not in written
        }
        self._kernels[key] = kernel
        return kernel

    def _on_device(self, name: str, array: np.ndarray) -> Any:
        """A device copy of `array`: made once for arrays that live as long as the model (released with
        the array), on every call for the others."""
        if name not in RESIDENT:
            return self._tensor_type.from_numpy(np.ascontiguousarray(array), name)
        tensor = self._resident.get(id(array))
        if tensor is None:
            tensor = self._tensor_type.from_numpy(np.ascontiguousarray(array), name)
            self._resident[id(array)] = tensor
            weakref.finalize(array, self._resident.pop, id(array), None)
        return tensor
