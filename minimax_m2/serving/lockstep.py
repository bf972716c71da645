"""Serving over W ranks in lockstep: the engine runs on rank 0, and every step's plan goes to every rank.

Rank 0 owns HTTP and the scheduler. Before each step it broadcasts the plan over the ranks' process group
(one fixed-size header, then one int32 buffer with the step's token ids, positions, cache rows, validity
and selected positions, or the cache rows to copy), and then runs the step itself; every other rank
receives the plan and runs the same units, so the collectives inside them meet. Sampling needs only the
logits every rank holds after the step, so nothing returns. While idle, rank 0 sends a heartbeat every
few seconds, so that a quiet server never looks like a lost rank; a rank that dies or stalls makes the
next broadcast or collective fail within the collective timeout on every rank.
"""

import time
from typing import Any

import numpy as np

from minimax_m2.model import MiniMaxM2Model
from minimax_m2.program import Step

STEP, COPY, HEARTBEAT, STOP = 1, 2, 3, 4
HEADER = 8  # command, rows, seq, selected per row, bucket, kv_len (0: derived), payload length, spare


class PlanSender:
    """Rank 0's side: `execute` and `copy` for the engine, each broadcasting the plan before running it."""

    def __init__(self, model: MiniMaxM2Model, backend: Any):
        self.model, self.backend = model, backend
        self.control_seconds = 0.0  # time spent broadcasting plans
        self.plans = 0

    def _send(self, fields: list[int], payload: np.ndarray) -> None:
        """A header (the command and its fields, the payload's length at index 6), then the payload."""
        start = time.perf_counter()
        header = fields + [0] * (6 - len(fields)) + [payload.size, 0]
        self.backend.broadcast(np.array(header, np.int64))
        if payload.size:
            self.backend.broadcast(payload)
        self.control_seconds += time.perf_counter() - start
        self.plans += 1

    def execute(self, step: Step) -> tuple[np.ndarray, np.ndarray]:
        rows, seq = step.input_ids.shape
        self._send([STEP, rows, seq, step.selected.shape[1], step.bucket, step.kv_len or 0], _pack(step))
        return self.model.run(step)

    def copy(self, copies: list[tuple[int, int, int]]) -> None:
        self._send([COPY, len(copies)], np.array(copies, np.int32).reshape(-1))
        self.model.copy_slots(copies)

    def heartbeat(self) -> None:
        self._send([HEARTBEAT], np.zeros(0, np.int32))

    def stop(self) -> None:
        """Tell every rank to finish (the server is shutting down)."""
        self._send([STOP], np.zeros(0, np.int32))


def _pack(step: Step) -> np.ndarray:
    return np.concatenate([step.input_ids.reshape(-1), step.positions.reshape(-1), step.slots,
                           step.token_valid.reshape(-1).astype(np.int32), step.selected.reshape(-1)]).astype(np.int32)


def _unpack(header: np.ndarray, payload: np.ndarray) -> Step:
    _, rows, seq, selected, bucket, kv_len = (int(v) for v in header[:6])
    parts = np.split(payload, np.cumsum([rows * seq, rows * seq, rows, rows * seq]))
    return Step(parts[0].reshape(rows, seq), parts[1].reshape(rows, seq), parts[2],
                parts[3].reshape(rows, seq).astype(bool), parts[4].reshape(rows, selected), bucket,
                kv_len or None)


def follow(model: MiniMaxM2Model, backend: Any) -> int:
    """Every rank but 0: run each plan rank 0 sends until it says stop -> steps run."""
    steps = 0
    while True:
        header = backend.broadcast(np.zeros(HEADER, np.int64))
        command, size = int(header[0]), int(header[6])
        payload = backend.broadcast(np.zeros(size, np.int32)) if size else np.zeros(0, np.int32)
        if command == STEP:
            model.run(_unpack(header, payload))
            steps += 1
        elif command == COPY:
            model.copy_slots([tuple(int(v) for v in row) for row in payload.reshape(-1, 3)])
        elif command == STOP:
            return steps
