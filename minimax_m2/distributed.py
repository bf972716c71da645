"""Multi-process CPU runs: torch.distributed (gloo) as the collectives backend, started by torchrun.

torch is needed only here, and only when more than one rank runs. Every collective has a timeout;
when one fails (a rank died, or never arrived), the surviving ranks name the ranks that stopped
answering, found through torchrun's rendezvous store, and exit with an error instead of hanging.
"""

import os
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import ml_dtypes
import numpy as np

from kernels import collectives
from kernels.collectives import ReplicaGroups, sum_in_rank_order
from minimax_m2.parallel import ParallelLayout

_REPORT_WAIT_SECONDS = 3.0
_ABORT_KEY = "minimax_m2/bad_input"


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def _carried(x: np.ndarray) -> np.ndarray:
    """x as an array gloo can carry: bfloat16 as its bytes (values unchanged; gloo has no 16-bit integers)."""
    return x.view(np.uint8) if x.dtype == BFLOAT16 else x


class CollectiveError(RuntimeError):
    """A collective failed or timed out on this rank."""


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        raise ImportError("runs over several ranks need torch for torch.distributed: "
                          "pip install torch==2.13.0") from err
    return torch, dist


class TorchCollectives:
    """kernels.collectives backend over torch.distributed gloo; counts the bytes all_to_all sends."""

    def __init__(self, groups: list[ReplicaGroups], timeout_seconds: float):
        torch, dist = _torch()
        self._torch, self._dist = torch, dist
        self.timeout = timeout_seconds
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_seconds))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=timeout_seconds),
        )
        self._groups: dict[tuple[int, ...], Any] = {tuple(range(self.world)): None}
        for replica_groups in groups:
            for members in replica_groups:
                if tuple(members) not in self._groups:
                    self._groups[tuple(members)] = dist.new_group(list(members))
        self.all_to_all_bytes = 0
        self._calls = 0

    def _members(self, replica_groups: ReplicaGroups) -> tuple[int, ...]:
        return next(tuple(g) for g in replica_groups if self.rank in g)

    def _run(self, name: str, members: tuple[int, ...], op: Callable[[], Any]) -> Any:
        self._calls += 1
        try:
            return op()
        except Exception as err:  # noqa: BLE001 - gloo raises several types; all end the run here
            silent = self._unresponsive(members)
            who = (f"ranks not responding: {', '.join(map(str, silent))}" if silent
                   else "every rank of the group responded")
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CollectiveError(
                f"rank {self.rank}: {name} #{self._calls} over ranks {list(members)} failed within the "
                f"{self.timeout:g} s timeout ({first_line}); {who}"
            ) from err

    def _unresponsive(self, members: tuple[int, ...]) -> list[int]:
        """Members that do not report this failure within a few seconds: dead, or stuck elsewhere."""
        try:
            self._store.set(f"minimax_m2/failed/{self.rank}", "1")
            deadline = time.monotonic() + _REPORT_WAIT_SECONDS
            silent = [m for m in members if m != self.rank]
            while silent and time.monotonic() < deadline:
                silent = [m for m in silent if not self._store.check([f"minimax_m2/failed/{m}"])]
                time.sleep(0.1)
            return silent
        except Exception:  # noqa: BLE001 - the store may be gone with its host; then nobody can be named
            return []

    def all_reduce(self, x: np.ndarray, replica_groups: ReplicaGroups) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == BFLOAT16:  # gloo has no bfloat16 reduction: gather the bits, add in rank order
            return sum_in_rank_order(self._gather(x, replica_groups))
        members = self._members(replica_groups)
        t = self._torch.from_numpy(np.array(x))
        self._run("all_reduce", members, lambda: self._dist.all_reduce(t, group=self._groups[members]))
        return t.numpy()

    def all_gather(self, x: np.ndarray, all_gather_dim: int, replica_groups: ReplicaGroups) -> np.ndarray:
        return np.concatenate(self._gather(x, replica_groups), axis=all_gather_dim)

    def _gather(self, x: np.ndarray, replica_groups: ReplicaGroups) -> list[np.ndarray]:
        """Every member's x, in group order (bfloat16 travels as its bytes, unchanged)."""
        members = self._members(replica_groups)
        x = np.ascontiguousarray(x)
        t = self._torch.from_numpy(_carried(x))
        out = [self._torch.empty_like(t) for _ in members]
        self._run("all_gather", members, lambda: self._dist.all_gather(out, t, group=self._groups[members]))
        return [o.numpy().view(x.dtype) for o in out]

    def all_to_all(self, x: np.ndarray, split_dimension: int, concat_dimension: int,
                   replica_groups: ReplicaGroups) -> np.ndarray:
        members = self._members(replica_groups)
        x = np.ascontiguousarray(np.stack(np.split(x, len(members), axis=split_dimension)))
        t = self._torch.from_numpy(_carried(x))
        out = self._torch.empty_like(t)
        self._run("all_to_all", members, lambda: self._dist.all_to_all_single(out, t, group=self._groups[members]))
        self.all_to_all_bytes += t.numel() * t.element_size() * (len(members) - 1) // len(members)
        return np.concatenate(list(out.numpy().view(x.dtype)), axis=concat_dimension)

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """Rank 0's x on every rank (x: the array to send on rank 0, one of its shape and dtype elsewhere)."""
        t = self._torch.from_numpy(np.ascontiguousarray(x))
        self._run("broadcast", tuple(range(self.world)), lambda: self._dist.broadcast(t, src=0))
        return t.numpy()

    def abort(self, message: str) -> None:
        """Tell every rank that this one stops on bad input (they then stop quietly, not as a lost rank)."""
        try:
            self._store.set(_ABORT_KEY, message)
        except Exception:  # noqa: BLE001 - with the store gone nobody can be told; they time out instead
            pass

    def aborted(self) -> str | None:
        """The message of a rank that stopped on bad input, if one did."""
        try:
            return self._store.get(_ABORT_KEY).decode() if self._store.check([_ABORT_KEY]) else None
        except Exception:  # noqa: BLE001
            return None

    def close(self) -> None:
        self._dist.destroy_process_group()


def world_size() -> int:
    """Ranks torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank under torchrun (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def start(tp: int, timeout_seconds: float, capacity_factor: float | None = None,
          moe_tp: int = 1) -> tuple[ParallelLayout, TorchCollectives | None]:
    """This process's layout from torchrun's environment; with more than one rank, joins the process
    group and installs the gloo backend. Without torchrun: one rank, no backend."""
    world = world_size()
    layout = ParallelLayout(world, tp, rank(), capacity_factor, moe_tp)
    if world == 1:
        return layout, None
    groups = [layout.world_groups, layout.tp_groups, layout.slice_groups, layout.ep_groups, layout.combine_groups]
    backend = TorchCollectives(groups, timeout_seconds)
    collectives.set_backend(backend)
    global active
    active = backend
    return layout, backend


active: TorchCollectives | None = None  # this process's backend once `start` has joined the process group


def under_torchrun() -> bool:
    """True when torchrun started this process (its launcher turns any non-zero exit into a traceback)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def on_launcher_exit(callback: Callable[[int], None], poll_seconds: float = 0.5) -> None:
    """Under torchrun, call callback(launcher pid) once, from a daemon thread, when the launcher is gone
    (killed with SIGKILL, it can neither stop nor signal its workers, which would otherwise run on)."""
    if not under_torchrun():
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        callback(launcher)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
