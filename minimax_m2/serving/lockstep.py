"""Serving over W ranks in lockstep: the engine runs on rank 0, and every step's plan goes to every rank.

Rank 0 owns HTTP and the scheduler. Before each step it broadcasts the plan over the ranks' process group
(one fixed-size header, then one int32 buffer with the step's token ids, positions, block tables, validity,
selected positions, where a spread step's groups write and what their blocks start at, each row's sampling
settings and random draw and the grammar masks of constrained rows,
or the cache blocks to copy), and then
runs the step itself; every other rank receives the plan and runs the same units (the same lm_head
variant too), so the collectives inside them meet. The next tokens come out identical on every rank, so
nothing returns. While idle, rank 0 sends a heartbeat every
few seconds, so that a quiet server never looks like a lost rank; a rank that dies or stalls makes the
next broadcast or collective fail within the collective timeout on every rank.
"""

import time
from typing import Any

import numpy as np

from minimax_m2.device.step import KV_BLOCK, Sampled, Spread, Step, StepOutput, mask_words, table_width
from minimax_m2.model import MiniMaxM2Model

STEP, COPY, HEARTBEAT, STOP = 1, 2, 3, 4
# header entries: the command, the step's fields (a copy's count in ROWS), the payload's length
COMMAND, ROWS, SEQ, SELECTED, BUCKET, KV_LEN, MAX_TOKENS, FLAGS, MASKS, SIZE = range(10)
HEADER = 10
# FLAGS bits: return_logits, sampling settings in the payload, logprobs, a draw for each selected token, caches
# spread over the groups
LOGITS, SAMPLED, LOGPROBS, DRAWS, SPREAD = 1, 2, 4, 8, 16


class PlanSender:
    """Rank 0's side: `execute` and `copy` for the engine, each broadcasting the plan before running it."""

    def __init__(self, model: MiniMaxM2Model, backend: Any):
        self.model, self.backend = model, backend
        self.control_seconds = 0.0  # time spent broadcasting plans
        self.control_bytes = 0  # bytes of the plans broadcast
        self.plans = 0

    def _send(self, fields: list[int], payload: np.ndarray) -> None:
        """A header (the command, its fields, the payload's length), then the payload."""
        start = time.perf_counter()
        header = np.zeros(HEADER, np.int64)
        header[: len(fields)] = fields
        header[SIZE] = payload.size
        self.backend.broadcast(header)
        if payload.size:
            self.backend.broadcast(payload)
        self.control_seconds += time.perf_counter() - start
        self.control_bytes += header.nbytes + payload.nbytes
        self.plans += 1

    def stats(self) -> dict[str, float]:
        """Plans broadcast, with the seconds and bytes they took (the control path's overhead)."""
        return {"plans": self.plans, "control_seconds": self.control_seconds, "control_bytes": self.control_bytes}

    def execute(self, step: Step) -> StepOutput:
        rows, seq = step.input_ids.shape
        flags = (LOGITS if step.return_logits else 0) | (SAMPLED if step.sampled is not None else 0) | \
            (LOGPROBS if step.logprobs else 0) | (DRAWS if step.sampled is not None and step.sampled.uniform.ndim == 2
                                                  else 0) | (SPREAD if step.spread is not None else 0)
        masks = step.resolved_masks()
        self._send([STEP, rows, seq, step.selected.shape[1], step.bucket, step.kv_len or 0, step.max_tokens, flags,
                    0 if masks is None else len(masks)], _pack(step))
        return self.model.run(step)

    def copy(self, copies: list[tuple[int, int, int]]) -> None:
        self._send([COPY, len(copies)], np.array(copies, np.int32).reshape(-1))
        self.model.copy_blocks(copies)

    def heartbeat(self) -> None:
        self._send([HEARTBEAT], np.zeros(0, np.int32))

    def stop(self) -> None:
        """Tell every rank to finish (the server is shutting down)."""
        self._send([STOP], np.zeros(0, np.int32))


def _pack(step: Step) -> np.ndarray:
    """The step's arrays as one int32 buffer (float32 settings by their bits)."""
    tables = step.kv_tiles if step.kv_tiles is not None else \
        step.spread.tables if step.spread is not None else step.block_tables
    parts = [step.input_ids.reshape(-1), step.positions.reshape(-1), tables.reshape(-1),
             step.token_valid.reshape(-1).astype(np.int32), step.selected.reshape(-1)]
    if step.spread is not None:
        parts.append(step.spread.written.reshape(-1))
        if step.spread.starts is not None:
            parts.append(step.spread.starts.reshape(-1))
    if step.sampled is not None:
        s = step.sampled
        parts += [s.temperature.astype(np.float32).view(np.int32), s.top_k.astype(np.int32),
                  s.top_p.astype(np.float32).view(np.int32), s.uniform.astype(np.float32).reshape(-1).view(np.int32)]
    if step.masks is not None:  # the masks of its constrained rows (a follower pads them to the bucket)
        parts += [step.mask_index, step.masks[: int(np.max(step.mask_index)) + 1].reshape(-1)]
    return np.concatenate([np.asarray(p, np.int32) for p in parts])


def _unpack(header: np.ndarray, payload: np.ndarray, model: MiniMaxM2Model) -> Step:
    """A step from its plan: a prefill's block tables (`table_width` of the context columns; a spread one's
    [dp, rows, kv_len / KV_BLOCK]), or a decode's tiles (kv_len / KV_BLOCK of them per attention group)."""
    rows, seq, selected, flags, masks = (int(header[i]) for i in (ROWS, SEQ, SELECTED, FLAGS, MASKS))
    dp, width = model.layout.dp, int(header[KV_LEN]) // KV_BLOCK
    spread = bool(flags & SPREAD)
    shape = (dp, width, 3) if seq == 1 else (dp, rows, width) if spread else (rows, table_width(model.max_seq_len))
    draws = rows * selected if flags & DRAWS else rows
    settings = [rows, rows, rows, draws] if flags & SAMPLED else []
    placed = ([dp * rows * seq] + [int(np.prod(shape))] * (seq > 1)) if spread else []
    sizes = [rows * seq, rows * seq, int(np.prod(shape)), rows * seq, rows * selected] + placed + settings + \
        [rows] * bool(masks)
    parts = np.split(payload, np.cumsum(sizes))
    tables = parts[2].reshape(shape)
    step = Step(parts[0].reshape(rows, seq), parts[1].reshape(rows, seq), None if seq == 1 or spread else tables,
                parts[3].reshape(rows, seq).astype(bool), parts[4].reshape(rows, selected), int(header[BUCKET]),
                int(header[KV_LEN]) or None, int(header[MAX_TOKENS]), return_logits=bool(flags & LOGITS),
                logprobs=bool(flags & LOGPROBS))
    if seq == 1:
        step.kv_tiles = tables
    if spread:
        step.spread = Spread(parts[5].reshape(dp, rows * seq))
        if seq > 1:
            step.spread.tables, step.spread.starts = tables, parts[6].reshape(shape)
    if flags & SAMPLED:
        temperature, top_k, top_p, uniform = parts[5 + len(placed) : 9 + len(placed)]
        uniform = uniform.view(np.float32).reshape(rows, selected) if flags & DRAWS else uniform.view(np.float32)
        step.sampled = Sampled(temperature.view(np.float32), top_k, top_p.view(np.float32), uniform)
    if masks:
        used = parts[-1].reshape(-1, mask_words(model.config.vocab_size))
        step.mask_index, step.masks = parts[-2], np.pad(used, ((0, masks - len(used)), (0, 0)))
    return step


def follow(model: MiniMaxM2Model, backend: Any) -> int:
    """Every rank but 0: run each plan rank 0 sends until it says stop -> steps run."""
    steps = 0
    while True:
        header = backend.broadcast(np.zeros(HEADER, np.int64))
        command, size = int(header[COMMAND]), int(header[SIZE])
        payload = backend.broadcast(np.zeros(size, np.int32)) if size else np.zeros(0, np.int32)
        if command == STEP:
            model.run(_unpack(header, payload, model))
            steps += 1
        elif command == COPY:
            model.copy_blocks([tuple(int(v) for v in row) for row in payload.reshape(-1, 3)])
        elif command == STOP:
            return steps
