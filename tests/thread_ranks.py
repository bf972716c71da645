"""Several ranks as threads of one process, exchanging data through a collectives backend.

Lets kernel-level tests run a multi-rank kernel in milliseconds; the torchrun tests cover real processes.
"""

import threading
from typing import Callable

import numpy as np

from kernels import collectives
from kernels.collectives import sum_in_rank_order


class ThreadCollectives:
    def __init__(self, world: int):
        self.world = world
        self._barrier = threading.Barrier(world, timeout=30)
        self._box: dict[int, np.ndarray] = {}
        self._local = threading.local()

    def _members(self, x: np.ndarray, replica_groups) -> list[np.ndarray]:
        """Every member's x, in the order of this rank's group (every rank calls each collective)."""
        rank = self._local.rank
        group = next(g for g in replica_groups if rank in g)
        self._box[rank] = np.array(x)
        self._barrier.wait()
        values = [self._box[m] for m in group]
        self._barrier.wait()
        return values

    def all_reduce(self, x, replica_groups):
        return sum_in_rank_order(self._members(x, replica_groups))

    def all_gather(self, x, all_gather_dim, replica_groups):
        return np.concatenate(self._members(x, replica_groups), axis=all_gather_dim)

    def broadcast(self, x):
        """Rank 0's x on every rank."""
        return self._members(x, [list(range(self.world))])[0].copy()

    def all_to_all(self, x, split_dimension, concat_dimension, replica_groups):
        rank = self._local.rank
        group = next(g for g in replica_groups if rank in g)
        chunks = [np.split(v, len(group), axis=split_dimension) for v in self._members(x, replica_groups)]
        return np.concatenate([chunks[i][group.index(rank)] for i in range(len(group))], axis=concat_dimension)

    def run(self, fn: Callable[[int], object]) -> list:
        """fn(rank) on every rank at once; their results in rank order."""
        results: list = [None] * self.world
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                errors.append(err)
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def plans_to_every_rank(world: int, load: Callable, blocks: int, lead: Callable) -> tuple[object, list[int]]:
    """Serving over `world` ranks as threads: each rank's model is load(rank) (its expert schedule measured);
    rank 0 runs lead(model, sender) with a `PlanSender` and then tells the others to stop, every other rank
    follows its plans with a KV pool of `blocks` blocks -> (lead's result, the steps each follower ran)."""
    from minimax_m2.serving.lockstep import PlanSender, follow

    backend = ThreadCollectives(world)

    def rank(r: int):
        model = load(r)
        model.schedule_cost()
        if r:
            model.allocate(blocks)
            return follow(model, backend)
        sender = PlanSender(model, backend)
        result = lead(model, sender)
        sender.stop()
        return result

    collectives.set_backend(backend)
    try:
        led, *steps = backend.run(rank)
    finally:
        collectives.set_backend(None)
    return led, steps
