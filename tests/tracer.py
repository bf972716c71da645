"""An array type that records every NumPy call a kernel makes on it, the way nkipy sees them.

Like nkipy's traced tensors, `Recorded` values reach NumPy only through `__array_function__` and
`__array_ufunc__`; calls whose arguments are all plain arrays run as trace-time constants and are
not recorded. Anything nkipy could not trace (value-dependent Python branching, boolean-mask
indexing, ufunc methods, silent conversion to a plain array) is recorded as a violation.
"""

from dataclasses import dataclass, field

import numpy as np

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


@dataclass
class Record:
    functions: set[str] = field(default_factory=set)
    methods: set[str] = field(default_factory=set)
    attributes: set[str] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)


def _unwrap(value):
    if isinstance(value, Recorded):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _has_recorded(value) -> bool:
    if isinstance(value, Recorded):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_recorded(v) for v in value)
    return False


class Recorded(np.lib.mixins.NDArrayOperatorsMixin):
    """Wraps an ndarray; every result computed from it is Recorded too."""

    def __init__(self, value: np.ndarray, record: Record):
        self.value = np.asarray(value)
        self.record = record

    def _wrap(self, result):
        if isinstance(result, np.ndarray) or np.isscalar(result) or isinstance(result, np.generic):
            return Recorded(result, self.record)
        if isinstance(result, (list, tuple)):
            return type(result)(self._wrap(r) for r in result)
        return result

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__":
            self.record.violations.append(f"ufunc method np.{ufunc.__name__}.{method}")
        self.record.functions.add(ufunc.__name__)
        return self._wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        name = func.__name__ if func.__module__ in ("numpy", "numpy.core.multiarray") else f"{func.__module__}.{func.__name__}"
        if func.__module__ == "numpy.linalg":
            name = f"linalg.{func.__name__}"
        self.record.functions.add(name)
        return self._wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    def __array__(self, dtype=None, copy=None):
        self.record.violations.append("converted to a plain ndarray (np.asarray / np.array on a traced tensor)")
        return self.value if dtype is None else self.value.astype(dtype)

    def _check_index(self, index, writing: bool) -> None:
        parts = index if isinstance(index, tuple) else (index,)
        for part in parts:
            value = part.value if isinstance(part, Recorded) else part
            if isinstance(value, np.ndarray) and value.dtype == bool:
                self.record.violations.append("boolean-mask indexing")
            if isinstance(value, list):
                self.record.violations.append("indexing with a Python list")
            if writing and part is None:
                self.record.violations.append("None in an assignment index")

    def __getitem__(self, index):
        self._check_index(index, writing=False)
        return self._wrap(self.value[_unwrap(index)])

    def __setitem__(self, index, new):
        self._check_index(index, writing=True)
        self.value[_unwrap(index)] = _unwrap(new)

    def _value_dependent(self, what: str):
        self.record.violations.append(f"{what} on a traced tensor (depends on its value)")
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

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self.value, name)
        if callable(attr):
            self.record.methods.add(name)
            return lambda *a, **k: self._wrap(attr(*_unwrap(a), **_unwrap(k)))
        self.record.attributes.add(name)
        return attr


class RecordingCollectives:
    """Collectives backend for a one-process trace: records the call and plays every rank's part
    with this rank's data (what nkipy's eager fallback does), so kernels run end to end."""

    def __init__(self, record: Record):
        self.record = record

    def _note(self, name: str, x) -> None:
        if not isinstance(x, Recorded):
            self.record.violations.append(f"{name} called on a value that is not traced")
        self.record.functions.add(f"collectives.{name}")

    def all_reduce(self, x, replica_groups):
        self._note("all_reduce", x)
        return Recorded(_unwrap(x) * len(replica_groups[0]), self.record)

    def all_gather(self, x, all_gather_dim, replica_groups):
        self._note("all_gather", x)
        return Recorded(np.concatenate([_unwrap(x)] * len(replica_groups[0]), axis=all_gather_dim), self.record)

    def all_to_all(self, x, split_dimension, concat_dimension, replica_groups):
        self._note("all_to_all", x)
        chunks = np.split(_unwrap(x), len(replica_groups[0]), axis=split_dimension)
        return Recorded(np.concatenate(chunks, axis=concat_dimension), self.record)


def violations(record: Record, allowed: dict) -> list[str]:
    """Everything recorded that nkipy's traceable subset (traceable_ops.json) does not list."""
    functions = set(allowed["numpy_functions"]) | {f"collectives.{c}" for c in allowed["nkipy_apis"]["nkipy.distributed.collectives"]}
    found = list(record.violations)
    found += [f"np.{f}" for f in sorted(record.functions - functions)]
    found += [f"ndarray.{m}()" for m in sorted(record.methods - set(allowed["ndarray_methods"]))]
    found += [f"ndarray.{a}" for a in sorted(record.attributes - set(allowed["ndarray_attributes"]))]
    return found
