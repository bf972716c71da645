"""Which requests run in the next step, and in what shape.

FIFO admission while an attention group has a free row and the blocks of the request's context (beyond
one block held back for each running request that will need another); every admitted request whose context is
cached decodes one token per step, taking a new block as its sequence crosses into one; when the pool has
none, the most recently admitted request of that group is preempted (its blocks released, itself queued
first again: it runs its context again when admitted, finding what is still cached). Prompts are
prefilled in chunks, several requests' chunks sharing a step up to `prefill_chunk` tokens, so that a long
prompt delays the running decodes by at most one chunk per step. Every step has a shape from a bounded set
(`ShapeSet`): decode rows per attention group from the request buckets, prefill rows x tokens from the
prefill buckets, and the attended cache length from the KV buckets.
"""

import itertools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from minimax_m2.device.step import KV_BLOCK, Step, blocks_for, decode_tiles, mask_bucket, min_rows, padding_step
from minimax_m2.serving.blocks import BlockManager, Placement
from minimax_m2.serving.request import Request
from minimax_m2.serving.verify_gate import VerifyGate


def powers_of_two(low: int, high: int) -> list[int]:
    values, v = [], low
    while v < high:
        values.append(v)
        v *= 2
    return values + [high]


# On a NeuronCore a prefill step attends at least this many positions (below it a chunk's attention costs less
# than a third of its projections and experts, so its length is not worth a program); on every target only a
# step attending at most this many runs several rows per attention group (above it, one row per group).
PREFILL_KV_FLOOR = 4096
# On a NeuronCore a decode step attends at least this many KV tiles (of KV_BLOCK positions) per attention group:
# 2,048 positions' keys and values are 65 MB a rank over the real model's 62 layers, 0.08 ms of a batch-1 step's
# 4.5 ms (benchmarks/roofline.py, section 4), and the tile buckets below it were 29 of the 322 programs of the
# README's serving flags at 196,608 positions
DECODE_TILE_FLOOR = 16


@dataclass(frozen=True)
class ShapeSet:
    """Every step shape the engine runs, fixed at start-up: a step has rows per attention group and a bucket
    (at most that many rows are real in all groups together, which sizes the experts' work).

    A decode step runs 2 rows per group or `max_num_seqs` (a padding row costs a row of the projections and
    of the exchanges, no expert and no cache read: a batch of one or two per group runs as few rows as a
    step can, a larger one runs them all rather than compiling every bucket between), unless its rows per
    group size its experts' buffers (`rows_size_experts`: a slice group spans fewer than all attention
    groups, so the bucket of real rows in all does not bound them), when every power of two is a bucket;
    its bucket a power of two and its tiles (`tile_counts`) the programs' other axes. A prefill step runs 1
    to `prefill_rows[-1]` rows of a token bucket each, every row's chunk counted against one budget
    (`prefill_chunk`, which also bounds the experts' work), attending a length of `kv_lengths`: from
    PREFILL_KV_FLOOR where each length is a compiled program, from KV_BLOCK on this CPU (`compiled` False: a
    shape costs nothing there, and attending 2,048 positions for a 150-token prompt was most of its prefill),
    several rows a step up to `several_rows_kv`."""

    groups: int
    decode_rows: tuple[int, ...]  # rows per group of a decode step
    decode_buckets: tuple[int, ...]  # real rows of a decode step in all groups
    prefill_rows: tuple[int, ...]
    prefill_tokens: tuple[int, ...]  # token buckets of one prefill row
    prefill_chunk: int  # prompt tokens per step, all rows together
    kv_lengths: tuple[int, ...]  # a prefill's (and a verify step's) attended lengths
    max_blocks: int  # blocks of one request's longest sequence
    several_rows_kv: int  # the longest attended length of a prefill step with several rows per group
    verify_tokens: int = 0  # tokens a row of a verify step holds (its last token and the drafts), 0: none
    compiled: bool = True  # every shape is a compiled program (else NumPy runs the steps: this CPU)

    @classmethod
    def build(cls, groups: int, max_num_seqs: int, prefill_chunk: int, max_seq_len: int,
              max_prefill_rows: int = 4, rows_size_experts: bool = False, speculative: int = 0,
              compiled: bool = True) -> "ShapeSet":
        """compiled: every shape is a program to compile (a NeuronCore), else steps run as NumPy (this CPU)."""
        most = max(min_rows(1), max_num_seqs)
        floor = PREFILL_KV_FLOOR if compiled else KV_BLOCK
        return cls(
            groups=groups,
            decode_rows=tuple(powers_of_two(min_rows(1), most) if rows_size_experts else sorted({min_rows(1), most})),
            decode_buckets=tuple(powers_of_two(1, max_num_seqs * groups)),
            prefill_rows=tuple(powers_of_two(1, min(max_prefill_rows, max_num_seqs))),
            prefill_tokens=tuple(powers_of_two(min(16, prefill_chunk), prefill_chunk)),
            prefill_chunk=prefill_chunk,
            kv_lengths=tuple(powers_of_two(min(floor, max_seq_len), max_seq_len)),
            max_blocks=blocks_for(max_seq_len),
            several_rows_kv=min(PREFILL_KV_FLOOR, max_seq_len),
            verify_tokens=speculative + 1 if speculative else 0,
            compiled=compiled,
        )

    def tile_counts(self, rows: int, bucket: int) -> list[int]:
        """Tile buckets of a decode step of `rows` rows per group, `bucket` real in all: powers of two from
        the tiles of its fullest group's fewest rows (one tile each; at least 2; where shapes are compiled, at
        least DECODE_TILE_FLOOR) up to the longest sequences of the real rows one group can hold."""
        least, low = 1 + max([r for r in self.decode_rows if r < rows], default=0), 2
        while low < least:
            low *= 2
        high = max(low, min(bucket, rows) * self.max_blocks)
        return powers_of_two(max(low, min(DECODE_TILE_FLOOR, high)) if self.compiled else low, high)

    def decode_pairs(self) -> list[tuple[int, int]]:
        """(rows per group, bucket) of every decode step: a step runs the fewest rows holding its fullest
        group, so its bucket exceeds the rows of the bucket before."""
        pairs, fewer = [], 0
        for rows in self.decode_rows:
            pairs += [(rows, b) for b in self.decode_buckets if fewer < b <= rows * self.groups]
            fewer = rows
        return pairs

    def holds(self, rows: int, tokens: int, kv_len: int) -> bool:
        """Whether a prefill step of `rows` rows per group, the longest of `tokens` tokens, attending kv_len
        positions, has a shape of the set."""
        r = self.bucket(rows, self.prefill_rows, "prefill rows")
        if r == self.prefill_rows[0]:
            return True
        return r * self.bucket(tokens, self.prefill_tokens, "tokens") <= 2 * self.prefill_chunk and \
            kv_len <= self.several_rows_kv

    def shapes(self) -> list[tuple[str, int, int, int, int]]:
        """(phase, rows per group, real rows in all, tokens per row, attended positions) of every program step.
        A prefill step's bucket is all its rows (the chunk budget bounds its real tokens); a prefill row of t
        tokens attends at least t positions; a decode step attends KV_BLOCK x its tiles; a verify step (the
        decode rows, each with its drafts) has a prefill's shape, every row of it real."""
        decode = [("decode", r, b, 1, n * KV_BLOCK) for r, b in self.decode_pairs() for n in self.tile_counts(r, b)]
        prefill = [("prefill", r, r * self.groups, t, kv) for r in self.prefill_rows for t in self.prefill_tokens
                   for kv in self.kv_lengths if kv >= t and self.holds(r, t, kv)]
        verify = [("verify", r, r * self.groups, self.verify_tokens, kv) for r in self.decode_rows
                  for kv in self.kv_lengths if self.verify_tokens]
        return decode + prefill + verify

    def padding_steps(self, scratch: int, width: int, keep_logits: bool, vocab: int) -> list[Step]:
        """A padding step (`padding_step`: cache rows in the scratch block, tables `width` wide) of each shape
        with each lm_head variant: sampling on the device or not, with logits or not, sampling with
        log-probabilities, and for a prefill, with the logits of every position (with keep_logits); a verify
        step with every position's ids, and with their logits; and once for each decode row count, each
        sampling variant with grammar masks (over `vocab` tokens) of each bucket up to its rows (a prefill's
        constrained rows choose their token on the host)."""
        chunk = {"decode": 0, "prefill": self.prefill_chunk, "verify": 0}
        variants = {"decode": [(s, logits, False, False) for s, logits in itertools.product((False, True), repeat=2)]
                    + [(True, False, False, True)]}
        variants["prefill"] = [variant for variant in variants["decode"] if variant[0]]  # a prefill may always sample
        variants["verify"] = [(True, False, True, False), (True, True, True, False)]  # every position's ids (logits)
        steps, heads = [], set()
        for phase, rows, bucket, seq, kv in self.shapes():
            rows = max(min_rows(seq), rows)
            shape = (rows, bucket, seq, self.groups, scratch, kv, width, chunk[phase])
            steps += [padding_step(*shape, *variant) for variant in variants[phase]]
            if keep_logits and phase == "prefill":
                steps.append(padding_step(*shape, True, True, True, False))
            if phase == "decode" and rows not in heads:
                heads.add(rows)
                total = rows * self.groups
                masks = sorted({mask_bucket(count, total) for count in range(1, total + 1)})
                steps += [padding_step(*shape, *variant, masks=m, vocab=vocab)  # with masks, a step may sample
                          for m in masks for variant in variants["prefill"]]
        return steps

    @staticmethod
    def bucket(needed: int, buckets: tuple[int, ...], what: str) -> int:
        for b in buckets:
            if needed <= b:
                return b
        raise ValueError(f"{needed} {what} exceed the largest compiled shape ({buckets[-1]})")


@dataclass
class Chunk:
    request: Request
    start: int  # position of its first token
    tokens: list[int]
    samples: bool  # the chunk ends the prompt: its last logits give the first new token


@dataclass
class Plan:
    """One engine step: block copies to make, a prefill step and a decode step (either may be absent)."""

    copies: list[Placement] = field(default_factory=list)
    prefill: tuple[Step, list[Chunk | None]] | None = None
    decode: tuple[Step, list[Request | None]] | None = None
    drafts: list[list[int]] | None = None  # each decode row's draft tokens when the decode step verifies them


class Scheduler:
    def __init__(self, blocks: BlockManager, shapes: ShapeSet, groups: int, max_num_seqs: int, width: int,
                 gate: VerifyGate | None = None):
        """width: block-table columns of every step (a request's most blocks, at least 2); gate: whether a
        decode step verifies its drafts."""
        self.blocks, self.shapes, self.groups = blocks, shapes, groups
        self.gate = gate or VerifyGate()
        self.max_num_seqs, self.width = max_num_seqs, width
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Free a request's blocks at once (it ended: EOS, stop, length, cancel or disconnect)."""
        if request in self.running:
            self.running.remove(request)
            self.blocks.release(request.group, request.blocks)
        elif request in self.waiting:
            self.waiting.remove(request)

    def plan(self) -> Plan:
        plan = Plan()
        while self.waiting:
            running = [sum(1 for r in self.running if r.group == g) for g in range(self.groups)]
            reserve = [sum(1 for r in self.running if r.group == g and blocks_for(r.final_length) > len(r.blocks))
                       for g in range(self.groups)]
            request = self.waiting[0]
            placement = self.blocks.place(request.context, bool(request.generated), reserve,
                                          [n < self.max_num_seqs for n in running])
            if placement is None:
                break
            self.waiting.popleft()
            request.admit(placement)
            self.running.append(request)
            if placement.copy is not None:
                plan.copies.append(placement)
        self._grow()
        plan.prefill = self._prefill_step()
        plan.decode, plan.drafts = self._decode_step()
        return plan

    def _grow(self) -> None:
        """A block for every decoding request whose next position starts one, preempting the most recently
        admitted request of its group while the pool has none."""
        for request in list(self.running):
            if request not in self.running or not request.decoding:
                continue
            while (request.length - 1) // KV_BLOCK >= len(request.blocks):
                if self.blocks.grow(request.group, request.blocks):
                    continue
                victim = next(r for r in reversed(self.running) if r.group == request.group)
                self.preempt(victim)
                if victim is request:
                    break

    def preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.release(request.group, request.blocks)
        request.evict()
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _prefill_step(self) -> tuple[Step, list[Chunk | None]] | None:
        budget = self.shapes.prefill_chunk
        per_group: list[list[Chunk]] = [[] for _ in range(self.groups)]
        for request in self.running:
            length = request.context_length
            if request.prefilled >= length or budget == 0:
                continue
            rows = per_group[request.group]
            if len(rows) == self.shapes.prefill_rows[-1]:
                continue
            count = min(length - request.prefilled, budget, self.shapes.prefill_tokens[-1])
            chunks = [c for g in per_group for c in g]
            longest = max([count] + [len(c.tokens) for c in chunks])
            end = max([request.prefilled + count] + [c.start + len(c.tokens) for c in chunks])
            if not self.shapes.holds(max(len(rows) + 1, *map(len, per_group)), longest, self._kv_len(longest, end)):
                break  # another row would make a shape outside the set: it waits for the next step
            budget -= count
            start = request.prefilled
            rows.append(Chunk(request, start, request.context_tokens(start, start + count),
                              start + count == length and not request.generated))
        chunks = [c for g in per_group for c in g]
        if not chunks:
            return None
        rows = self.shapes.bucket(max(map(len, per_group)), self.shapes.prefill_rows, "prefill rows")
        seq = ShapeSet.bucket(max(len(c.tokens) for c in chunks), self.shapes.prefill_tokens, "tokens")
        order: list[Chunk | None] = [g[i] if i < len(g) else None for g in per_group for i in range(rows)]
        keep_all = any(c is not None and c.request.keep_logits for c in order)
        step = self._step(rows, rows * self.groups, seq,
                          [(c.request.blocks, c.start, c.tokens) if c else None for c in order], keep_all)
        step.max_tokens = self.shapes.prefill_chunk  # the budget: the experts see at most this many tokens
        step.kv_len = self._kv_len(seq, max(c.start + len(c.tokens) for c in chunks))
        return step, order

    def _kv_len(self, tokens: int, end: int) -> int:
        """The attended length of a prefill step whose longest row has `tokens` tokens and whose rows end at
        most at position `end`."""
        return ShapeSet.bucket(max(end, ShapeSet.bucket(tokens, self.shapes.prefill_tokens, "tokens")),
                               self.shapes.kv_lengths, "attended positions")

    def _decode_step(self) -> tuple[tuple[Step, list[Request | None]] | None, list[list[int]] | None]:
        """The decode step, and each row's drafts when it verifies them (`_verify_step`)."""
        per_group: list[list[Request]] = [[] for _ in range(self.groups)]
        for request in self.running:
            if request.decoding:
                per_group[request.group].append(request)
        if not any(per_group):
            return None, None
        rows = ShapeSet.bucket(max(map(len, per_group)), self.shapes.decode_rows, "decode rows")
        bucket = ShapeSet.bucket(sum(map(len, per_group)), self.shapes.decode_buckets, "decode rows")
        order: list[Request | None] = [g[i] if i < len(g) else None for g in per_group for i in range(rows)]
        if self.shapes.verify_tokens:
            drafts = [self._draft(r) if r else [] for r in order]
            if any(drafts):
                real = [(r, d) for r, d in zip(order, drafts) if r]
                expected = sum(1 + min(len(d), r.drafter.expected) if d else 1 for r, d in real)
                if self.gate.opens(rows * self.groups, sum(1 + len(d) for _, d in real), len(real), expected):
                    return self._verify_step(rows, order, drafts), drafts
                for r, d in real:
                    if d:
                        r.drafter.watch(d)
        step = self._step(rows, bucket, 1,
                          [(r.blocks, r.length - 1, [r.generated[-1]]) if r else None for r in order], False)
        groups = [[(i, r.blocks, r.length - 1) for i, r in enumerate(g)] for g in per_group]
        needed = max(sum(position // KV_BLOCK + 1 for _, _, position in g) for g in groups)
        count = ShapeSet.bucket(needed, tuple(self.shapes.tile_counts(rows, bucket)), "decode tiles")
        step.kv_tiles = decode_tiles(groups, count, self.blocks.blocks_per_group)
        step.kv_len = count * KV_BLOCK
        return (step, order), None

    def _draft(self, request: Request) -> list[int]:
        """A decoding request's drafts: up to its own adaptive count, none past its new tokens' budget or the
        context, and only into blocks it holds or the pool can spare (speculation never preempts)."""
        if request.drafter is None:
            return []
        room = min(request.drafter.k, self.shapes.verify_tokens - 1, self.shapes.kv_lengths[-1] - request.length,
                   request.sampling.max_new_tokens - len(request.generated) - 1)
        while room > 0 and (request.length - 1 + room) // KV_BLOCK >= len(request.blocks):
            if not self.blocks.grow(request.group, request.blocks):
                room = len(request.blocks) * KV_BLOCK - request.length
        return request.drafter.draft(request.sequence, room)

    def _verify_step(self, rows: int, order: list[Request | None], drafts: list[list[int]]) -> tuple[Step, list]:
        """A step of the decode rows each holding its last token and its drafts (a prefill's shape, every
        position's next token selected): one step checks them all."""
        seq = self.shapes.verify_tokens
        entries = [(r.blocks, r.length - 1, [r.generated[-1]] + d) if r else None for r, d in zip(order, drafts)]
        step = self._step(rows, rows * self.groups, seq, entries, True)
        if not self.shapes.compiled:  # no program to share: the experts sized for the real tokens, not the padding
            step.max_tokens = sum(1 + len(d) for r, d in zip(order, drafts) if r)
        end = max(r.length + len(d) for r, d in zip(order, drafts) if r)
        step.kv_len = ShapeSet.bucket(end, self.shapes.kv_lengths, "attended positions")
        return step, order

    def _step(self, rows: int, bucket: int, seq: int, entries: list[tuple[list[int], int, list[int]] | None],
              keep_all: bool) -> Step:
        """Step arrays for `rows` rows per group, at most `bucket` real in all (entries in group order: (block
        table, start, tokens) or None for padding), each real row's tokens at positions start.. through its
        blocks; padding in the scratch block."""
        total = rows * self.groups
        ids = np.zeros((total, seq), np.int32)
        positions = np.zeros((total, seq), np.int32)
        # a prefill's block tables (padding rows: the scratch block); a decode step carries tiles instead
        tables = np.full((total, self.width), self.blocks.blocks_per_group, np.int32) if seq > 1 else None
        valid = np.zeros((total, seq), bool)
        last = np.zeros(total, np.int32)
        for r, entry in enumerate(entries):
            if entry is None:
                continue
            blocks, start, tokens = entry
            n = len(tokens)
            ids[r, :n] = tokens
            positions[r, :n] = np.arange(start, start + n)
            positions[r, n:] = start + n - 1
            if tables is not None:
                tables[r, : len(blocks)] = blocks
            valid[r, :n] = True
            last[r] = n - 1
        selected = np.tile(np.arange(seq, dtype=np.int32), (total, 1)) if keep_all else last[:, None]
        return Step(ids, positions, tables, valid, selected, bucket)
