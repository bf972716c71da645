"""Run a device unit on arrays that compute as nkipy's traced tensors do, and record its program.

nkipy traces a kernel by handing it tensor objects that receive every NumPy call through
`__array_function__` / `__array_ufunc__`. `Traced` does the same on CPU, but computes each call with
the semantics nkipy's HLO has where it differs from NumPy (measured, ../shared/nkipy/SEMANTICS.md):

- a sum over booleans is a logical OR; an integer cumsum is float32 (an N x N triangular matmul);
- integer `/` truncates to int32; argmax and every integer result is int32, every float64 float32;
- gathers clamp negative or past-the-end indices instead of wrapping;

and records as a violation what gives invalid HLO or a program other than the one NumPy runs, or what
the Neuron compiler may not keep (an input or output with a dimension of size 1, a 64-bit constant):
integer `//` or `%`, a float used as an index, a NumPy constant as a matmul operand (nkipy's dot
rejects it: found tracing these kernels with nkipy itself), boolean-mask indexing, value-dependent Python
(`bool()`, `int()`, iteration), conversion to a plain array, a ufunc method, `all_to_all` with
different split and concat dimensions, a collective on a value not computed from the inputs, a result
not computed from the inputs, and any array reaching the unit other than as a top-level argument.

The `Program` also holds what sizes the compiled unit: the op sequence with its constants' digests
(equal on every rank when the program is), trace-time constant bytes, matmul FLOPs, the weight bytes
each matmul reads (a weight stored as 8-bit codes counted at one byte an element, however it is decoded
on the way), the element-wise work of decoding such weights, and collective payloads.
"""

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels.collectives import ReplicaGroups, sum_in_rank_order

_PROPAGATES_WEIGHT = {"reshape", "transpose", "swapaxes", "squeeze", "expand_dims", "take", "astype", "copy", "ravel"}
_local = threading.local()


@dataclass
class Matmul:
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype: str
    flops: int
    weight: str | None  # name of the weight argument an operand was taken from
    weight_bytes: int


@dataclass
class Collective:
    name: str
    payload_bytes: int
    replica_groups: tuple[tuple[int, ...], ...]


@dataclass
class Program:
    """What one traced unit does, as recorded."""

    ops: list[tuple] = field(default_factory=list)
    functions: set[str] = field(default_factory=set)
    methods: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)
    constants: dict[str, int] = field(default_factory=dict)  # digest -> bytes
    matmuls: list[Matmul] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    decode_ops: int = 0  # element-wise operations on values computed from 8-bit weights (decoding them)
    dry: bool = False  # matmuls return zeros of their shape: sizes the program without computing it

    @property
    def constant_bytes(self) -> int:
        return sum(self.constants.values())

    @property
    def largest_constant(self) -> int:
        return max(self.constants.values(), default=0)

    @property
    def flops(self) -> int:
        return sum(m.flops for m in self.matmuls)

    def weight_bytes(self, names: tuple[str, ...] | None = None) -> int:
        """Bytes of weights the matmuls read (only those of `names` when given)."""
        return sum(m.weight_bytes for m in self.matmuls if m.weight and (names is None or m.weight in names))

    def violate(self, what: str) -> None:
        if what not in self.violations:
            self.violations.append(what)


def current() -> Program:
    program = getattr(_local, "program", None)
    if program is None:
        raise RuntimeError("no unit is being traced on this thread")
    return program


def _digest(value: np.ndarray) -> str:
    return hashlib.sha1(value.dtype.str.encode() + repr(value.shape).encode() + value.tobytes()).hexdigest()[:16]


def _device_dtype(value: np.ndarray) -> np.ndarray:
    """nkipy has no 64-bit types on the device: int64 -> int32, float64 -> float32."""
    if value.dtype == np.int64:
        return value.astype(np.int32)
    if value.dtype == np.uint64:
        return value.astype(np.uint32)
    if value.dtype == np.float64:
        return value.astype(np.float32)
    return value


def _is_int(value: Any) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.integer)


class Traced(np.lib.mixins.NDArrayOperatorsMixin):
    """A value inside a traced unit; every result computed from it is Traced too."""

    def __init__(self, value: Any, weight: str | None = None, coded: bool = False):
        self.value = _device_dtype(np.asarray(value))
        self.weight = weight
        self.coded = coded  # computed from a weight stored as 8-bit codes: it reads one byte an element

    # --- the ops ---------------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        program = current()
        name = ufunc.__name__
        if method != "__call__":
            program.violate(f"ufunc method np.{name}.{method}")
        values = [_unwrap(v) for v in inputs]
        _record(name, inputs, kwargs)
        if name in ("floor_divide", "remainder") and any(_is_int(v) for v in values):
            program.violate(f"integer np.{name} ({'//' if name == 'floor_divide' else '%'}): invalid HLO")
        if name in ("divide", "true_divide") and all(_is_int(v) for v in values):
            result = np.trunc(np.true_divide(*values)).astype(np.int32)
        elif name == "matmul":
            result = _matmul_shaped_zeros(*values) if program.dry else ufunc(*values, **_unwrap(kwargs))
            _record_matmul(inputs, values, result)
        else:
            result = getattr(ufunc, method)(*values, **_unwrap(kwargs))
            return _decoding(inputs, _wrap(result))
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__
        if func.__module__ == "numpy.linalg":
            name = f"linalg.{name}"
        elif func.__module__ not in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
            name = f"{func.__module__}.{name}"
        _record(name, args, kwargs)
        values, kw = _unwrap(args), _unwrap(kwargs)
        if name in ("sum", "any") and values[0].dtype == bool:
            kw.pop("dtype", None)
            return _wrap(np.any(values[0], **kw))
        if name == "cumsum" and _is_int(values[0]):
            axis = kw.get("axis")
            n = values[0].size if axis is None else values[0].shape[axis]
            current().constants[f"cumsum triangle {n}"] = n * n * 4
            return _wrap(np.cumsum(values[0].astype(np.float32), **kw))
        if name in ("take", "take_along_axis"):
            values = list(values)
            values[1] = _gather_index(values[0], values[1], kw.get("axis", values[2] if len(values) > 2 else None))
        result = _wrap(func(*values, **kw))
        first = args[0] if args else None
        if name in _PROPAGATES_WEIGHT and isinstance(first, Traced) and isinstance(result, Traced):
            result.weight, result.coded = first.weight, first.coded
        elif name == "where":
            result = _decoding(args, result)
        return result

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self.value, name)
        program = current()
        if not callable(attr):
            program.attributes.add(name)
            return attr
        program.methods.add(name)

        def method(*args, **kwargs):
            program.ops.append((f"ndarray.{name}", _signature(self), _signature(args), _signature(kwargs)))
            if name in ("sum", "any") and self.value.dtype == bool:
                kwargs.pop("dtype", None)
                return _wrap(self.value.any(*_unwrap(args), **_unwrap(kwargs)))
            result = _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
            if name in _PROPAGATES_WEIGHT and isinstance(result, Traced):
                result.weight, result.coded = self.weight, self.coded
                if name == "astype" and self.coded:
                    program.decode_ops += result.value.size
            return result

        return method

    # --- indexing --------------------------------------------------------------------------------
    def _index(self, index, writing: bool):
        program = current()
        parts = index if isinstance(index, tuple) else (index,)
        out = []
        axis = 0
        for part in parts:
            value = part.value if isinstance(part, Traced) else part
            if isinstance(value, list):
                program.violate("indexing with a Python list")
            if writing and part is None:
                program.violate("None in an assignment index")
            if isinstance(value, np.ndarray) and value.dtype == bool:
                program.violate("boolean-mask indexing")
            elif isinstance(value, np.ndarray) and not _is_int(value):
                program.violate("a float array used as an index: invalid HLO")
            elif isinstance(part, Traced):
                value = value if writing else _gather_index(self.value, value, axis)
            elif isinstance(value, np.ndarray):
                program.constants[_digest(value)] = value.nbytes
                if value.dtype in (np.int64, np.uint64):
                    program.violate(f"a {value.dtype} constant index {list(value.shape)} (build it as int32)")
            out.append(value)
            axis += 0 if part is None else 1
        program.ops.append(("setitem" if writing else "getitem", _signature(self), _signature(index)))
        return tuple(out) if isinstance(index, tuple) else out[0]

    def __getitem__(self, index):
        return Traced(self.value[self._index(index, writing=False)], self.weight, self.coded)

    def __setitem__(self, index, new):
        self.value[self._index(index, writing=True)] = _unwrap(new)

    # --- what a tracer cannot do -----------------------------------------------------------------
    def _value_dependent(self, what: str):
        current().violate(f"{what} on a traced tensor (depends on its value)")
        raise TypeError(f"{what} is not traceable")

    def __bool__(self):
        self._value_dependent("bool()")

    def __int__(self):
        self._value_dependent("int()")

    def __float__(self):
        self._value_dependent("float()")

    def __index__(self):
        self._value_dependent("use as a Python index")

    def __iter__(self):
        self._value_dependent("iteration")

    def __len__(self):
        self._value_dependent("len()")

    def __array__(self, dtype=None, copy=None):
        current().violate("converted to a plain ndarray (np.asarray / np.array on a traced tensor)")
        return self.value if dtype is None else self.value.astype(dtype)


def _gather_index(source: np.ndarray, index: Any, axis: int | None) -> Any:
    """Gather indices as HLO uses them: clamped into range, never wrapped. A float index is invalid."""
    index = np.asarray(index)
    if not _is_int(index):
        current().violate("a float array used as an index: invalid HLO")
        return index.astype(np.int64)
    size = source.size if axis is None else source.shape[axis]
    return np.clip(index, 0, size - 1)


def _unwrap(value: Any) -> Any:
    if isinstance(value, Traced):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _decoding(inputs: Any, result: Any) -> Any:
    """An element-wise result computed from an 8-bit weight's values: still that weight (a matmul taking it
    reads the weight's codes), its elements counted as decoding work."""
    coded = next((t for t in inputs if isinstance(t, Traced) and t.coded), None)
    if coded is not None and isinstance(result, Traced):
        result.weight, result.coded = coded.weight, True
        current().decode_ops += result.value.size
    return result


def _wrap(result: Any) -> Any:
    if isinstance(result, (np.ndarray, np.generic)):
        return Traced(result)
    if isinstance(result, (list, tuple)):
        return type(result)(_wrap(r) for r in result)
    return result


def _signature(value: Any) -> Any:
    """What the op sequence records of an argument: shape and dtype of tensors, digests of constants."""
    if isinstance(value, Traced):
        return ("tensor", value.value.shape, value.value.dtype.str)
    if isinstance(value, np.ndarray):
        return ("constant", _digest(value))
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", value.start, value.stop, value.step)
    if isinstance(value, np.dtype) or isinstance(value, type):
        return ("dtype", np.dtype(value).str)
    return repr(value)


def _record(name: str, args: Any, kwargs: dict) -> None:
    program = current()
    program.functions.add(name)
    program.ops.append((name, _signature(args), _signature(kwargs)))
    for value in list(args) + list(kwargs.values()):
        for leaf in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(leaf, np.ndarray) and leaf.ndim > 0:
                program.constants[_digest(leaf)] = leaf.nbytes
                if leaf.dtype in (np.int64, np.uint64, np.float64):
                    program.violate(f"a {leaf.dtype} constant {list(leaf.shape)} in np.{name} (build index constants "
                                    "as int32: a 64-bit type may not reach the Neuron compiler)")


def _matmul_shaped_zeros(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    return np.zeros(shape, np.result_type(a, b))


def _record_matmul(inputs: tuple, values: list, result: np.ndarray) -> None:
    a, b = values
    weights = [(t.weight, t.value.size if t.coded else t.value.nbytes) for t in inputs
               if isinstance(t, Traced) and t.weight]
    current().matmuls.append(Matmul(
        a.shape, b.shape, str(np.result_type(a, b)), 2 * int(result.size) * int(a.shape[-1]),
        weights[0][0] if weights else None, sum(n for _, n in weights),
    ))
    if not all(isinstance(t, Traced) for t in inputs):
        current().violate("a NumPy constant as a matmul operand: nkipy's dot takes traced tensors only")


class EmulatedCollectives:
    """Collectives backend wrapper for traced units: records each call on the calling thread's program,
    checks it as nkipy would, and passes the plain values to `inner` (threads as ranks, or one rank
    playing every rank's part: `LoopbackCollectives`)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def _call(self, name: str, x: Any, replica_groups: ReplicaGroups, *args: Any) -> Traced:
        program = current()
        if not isinstance(x, Traced):
            program.violate(f"{name} on a value not computed from the unit's inputs")
        value = _unwrap(x)
        program.functions.add(f"collectives.{name}")
        program.ops.append((f"collectives.{name}", _signature(x), repr(args), repr(replica_groups)))
        program.collectives.append(Collective(name, int(value.nbytes), tuple(tuple(g) for g in replica_groups)))
        return Traced(getattr(self.inner, name)(value, *args, replica_groups))

    def all_reduce(self, x, replica_groups):
        return self._call("all_reduce", x, replica_groups)

    def all_gather(self, x, all_gather_dim, replica_groups):
        return self._call("all_gather", x, replica_groups, all_gather_dim)

    def all_to_all(self, x, split_dimension, concat_dimension, replica_groups):
        if split_dimension != concat_dimension:
            current().violate("all_to_all with concat_dimension != split_dimension (nkipy drops concat_dimension)")
        return self._call("all_to_all", x, replica_groups, split_dimension, concat_dimension)


class LoopbackCollectives:
    """One rank standing for all: every member holds this rank's data (the shapes and bytes of a
    multi-rank unit, not its values)."""

    def all_reduce(self, x, replica_groups):
        return sum_in_rank_order([x] * len(replica_groups[0]))

    def all_gather(self, x, all_gather_dim, replica_groups):
        return np.concatenate([x] * len(replica_groups[0]), axis=all_gather_dim)

    def all_to_all(self, x, split_dimension, concat_dimension, replica_groups):
        return np.concatenate(np.split(x, len(replica_groups[0]), axis=split_dimension), axis=concat_dimension)


def _holds_array(value: Any) -> bool:
    if isinstance(value, (np.ndarray, Traced)):
        return True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_holds_array(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return any(_holds_array(v) for v in value.values())
    if isinstance(value, (list, tuple, set)):
        return any(_holds_array(v) for v in value)
    return False


def _check_interface(program: Program, what: str, value: np.ndarray) -> None:
    """A compiled unit's inputs and outputs: no dimension of size 1 (the Neuron compiler squeezes them), no
    scalar, no 64-bit type."""
    if value.ndim == 0 or 1 in value.shape:
        program.violate(f"{what} has shape {list(value.shape)}: a dimension of size 1 (or none), which the Neuron "
                        "compiler squeezes")
    if value.dtype in (np.int64, np.uint64, np.float64):
        program.violate(f"{what} is {value.dtype}: no 64-bit type may enter a unit")


def trace_unit(
    fn: Callable[..., Any], inputs: dict[str, Any], constants: dict[str, Any], weights: tuple[str, ...] = (),
    dry: bool = False,
) -> tuple[Program, Any]:
    """Run fn(**inputs, **constants) as nkipy would trace it -> (program, outputs as plain arrays).

    Only top-level np.ndarray inputs become parameters (int64/float64 cast to int32/float32); inputs
    named in `weights` are tagged so matmuls count the bytes they read. Input arrays written by the
    unit (KV caches) are written in place, as nkipy aliases them. `dry` skips the matmuls' arithmetic
    (their results are zeros): for sizing a program whose values do not matter.
    """
    program = Program(dry=dry)
    _local.program = program
    try:
        args = {}
        for name, value in inputs.items():
            if not isinstance(value, np.ndarray):
                program.violate(f"input {name!r} is a {type(value).__name__}, not an array: baked in as a constant")
                args[name] = value
                continue
            _check_interface(program, f"input {name!r}", value)
            args[name] = Traced(value, name if name in weights else None, name in weights and value.dtype.itemsize == 1)
        for name, value in constants.items():
            if _holds_array(value):
                program.violate(f"constant {name!r} holds an array: it would be baked into the program")
        try:
            result = fn(**args, **constants)
        except TypeError as err:
            if not program.violations:
                raise
            return program, err
        outputs = result if isinstance(result, tuple) else (result,)
        for i, out in enumerate(outputs):
            if not isinstance(out, Traced):
                program.violate(f"returns a {type(out).__name__} not computed from the inputs (nkipy: "
                                "Unexpected return value type)")
            else:
                _check_interface(program, f"output {i}", out.value)
        plain = tuple(_unwrap(o) for o in outputs)
        return program, plain if isinstance(result, tuple) else plain[0]
    finally:
        _local.program = None


def outside_subset(program: Program, allowed: dict) -> list[str]:
    """Calls the program makes that nkipy's traceable subset (traceable_ops.json) does not list."""
    functions = set(allowed["numpy_functions"]) | {
        f"collectives.{c}" for c in allowed["nkipy_apis"]["nkipy.distributed.collectives"]
    }
    found = [f"np.{f}" for f in sorted(program.functions - functions)]
    found += [f"ndarray.{m}()" for m in sorted(program.methods - set(allowed["ndarray_methods"]))]
    found += [f"ndarray.{a}" for a in sorted(program.attributes - set(allowed["ndarray_attributes"]))]
    return found
