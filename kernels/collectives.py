"""The one place kernels reach other ranks.

`replica_groups` is a partition of all ranks into groups, as nkipy spells it (e.g. [[0, 1], [2, 3]]).
With groups of one rank every call is the identity, so single-process kernels never need a backend.
Otherwise the call goes to the installed backend: nkipy's in-kernel collectives inside a trace,
torch.distributed (gloo) in CPU processes (see `minimax_m2.distributed`).
"""

from typing import Any, Protocol, Sequence

import numpy as np

ReplicaGroups = Sequence[Sequence[int]]


class Backend(Protocol):
    def all_reduce(self, x: Any, replica_groups: ReplicaGroups) -> Any: ...

    def all_gather(self, x: Any, all_gather_dim: int, replica_groups: ReplicaGroups) -> Any: ...

    def all_to_all(self, x: Any, split_dimension: int, concat_dimension: int, replica_groups: ReplicaGroups) -> Any: ...


_backend: Backend | None = None


def set_backend(backend: Backend | None) -> Backend | None:
    """Install the transport used by groups larger than one rank (None removes it); returns the one
    it replaces."""
    global _backend
    previous, _backend = _backend, backend
    return previous


def group_size(replica_groups: ReplicaGroups | None) -> int:
    """Ranks per group (1 when there is no group)."""
    return 1 if not replica_groups else len(replica_groups[0])


def _require_backend() -> Backend:
    if _backend is None:
        raise RuntimeError("a collective over several ranks was called but no collectives backend is installed")
    return _backend


def all_reduce(x: Any, replica_groups: ReplicaGroups | None) -> Any:
    """Sum of `x` over the ranks of this rank's group."""
    if group_size(replica_groups) == 1:
        return x
    return _require_backend().all_reduce(x, replica_groups)


def all_gather(x: Any, all_gather_dim: int, replica_groups: ReplicaGroups | None) -> Any:
    """Concatenation of every group member's `x` along `all_gather_dim`, in rank order."""
    if group_size(replica_groups) == 1:
        return x
    return _require_backend().all_gather(x, all_gather_dim, replica_groups)


def all_to_all(x: Any, split_dimension: int, concat_dimension: int, replica_groups: ReplicaGroups | None) -> Any:
    """Split `x` in group-size chunks along `split_dimension`, chunk i to member i, concatenate what arrives."""
    if group_size(replica_groups) == 1:
        return x
    return _require_backend().all_to_all(x, split_dimension, concat_dimension, replica_groups)


def sum_in_rank_order(values: Sequence[np.ndarray]) -> np.ndarray:
    """The all_reduce sum the CPU backends compute from every member's array (in group order): floats
    accumulate in float32 (or wider) rank by rank and the result takes the members' dtype (a bfloat16 sum
    is rounded once, and every backend gives the same bits); integers add in their own dtype."""
    first = values[0]
    floating = first.dtype.kind == "V" or np.issubdtype(first.dtype, np.floating)  # bfloat16 is kind "V"
    total = np.zeros(first.shape, np.result_type(first.dtype, np.float32) if floating else first.dtype)
    for value in values:
        total = total + value.astype(total.dtype)
    return total.astype(first.dtype)


class NkipyCollectives:
    """Backend for kernels traced by nkipy: its in-kernel collectives, compiled into the kernel as HLO.
    tests/test_nkipy_trace.py traces every device unit with it when nkipy is importable (it is not in CI)."""

    def __init__(self) -> None:
        try:
            from nkipy.distributed import collectives as nkipy_collectives
        except ImportError as err:
            raise ImportError("nkipy collectives need nkipy, installed on Trainium hosts with the Neuron SDK") from err
        self._cc = nkipy_collectives

    def all_reduce(self, x: Any, replica_groups: ReplicaGroups) -> Any:
        return self._cc.all_reduce(x, replica_groups=replica_groups)

    def all_gather(self, x: Any, all_gather_dim: int, replica_groups: ReplicaGroups) -> Any:
        return self._cc.all_gather(x, all_gather_dim=all_gather_dim, replica_groups=replica_groups)

    def all_to_all(self, x: Any, split_dimension: int, concat_dimension: int, replica_groups: ReplicaGroups) -> Any:
        return self._cc.all_to_all(
            x, split_dimension=split_dimension, concat_dimension=concat_dimension, replica_groups=replica_groups
        )
