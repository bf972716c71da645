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

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from minimax_m2.device.step import KV_BLOCK, Step, blocks_for, decode_tiles, spread_step
from minimax_m2.serving.blocks import BlockManager, Placement
from minimax_m2.serving.request import Request
from minimax_m2.serving.shapes import ShapeSet
from minimax_m2.serving.verify_gate import VerifyGate


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
            self.blocks.release(request.group, request.blocks, request.striped)
        elif request in self.waiting:
            self.waiting.remove(request)

    def plan(self) -> Plan:
        plan = Plan()
        while self.waiting:
            running = [sum(1 for r in self.running if r.group == g) for g in range(self.groups)]
            reserve = [sum(1 for r in self.running if (r.group == g or r.striped)
                           and blocks_for(r.final_length) > len(r.blocks)) for g in range(self.groups)]
            request = self.waiting[0]
            place = self.blocks.place_striped if self._spreads(request) else self.blocks.place
            placement = place(request.context, bool(request.generated), reserve,
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

    def _spreads(self, request: Request) -> bool:
        """Whether the request's cache is striped over the groups when it is admitted: its context reaches
        `ShapeSet.spread_from`."""
        return bool(self.shapes.spread_from) and request.context_length >= self.shapes.spread_from

    def _grow(self) -> None:
        """A block for every decoding request whose next position starts one, preempting the most recently
        admitted request holding blocks in that block's group while its pool has none."""
        for request in list(self.running):
            if request not in self.running or not request.decoding:
                continue
            while (request.length - 1) // KV_BLOCK >= len(request.blocks):
                if self.blocks.grow(request.group, request.blocks, request.striped):
                    continue
                pool = self.blocks.owner(request.group, len(request.blocks), request.striped)
                victim = next(r for r in reversed(self.running) if r.group == pool or r.striped)
                self.preempt(victim)
                if victim is request:
                    break

    def preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.release(request.group, request.blocks, request.striped)
        request.evict()
        self.waiting.appendleft(request)
        self.preemptions += 1

    def _prefill_step(self) -> tuple[Step, list[Chunk | None]] | None:
        """The next prefill step: chunks of the admitted requests' contexts, several requests' within the
        budget, or the first waiting for its prefill's consecutive chunks alone when its cache is striped."""
        first = next((r for r in self.running if r.prefilled < r.context_length), None)
        if first is not None and first.striped:
            return self._spread_prefill_step(first)
        budget = self.shapes.prefill_chunk
        per_group: list[list[Chunk]] = [[] for _ in range(self.groups)]
        for request in self.running:
            length = request.context_length
            if request.prefilled >= length or budget == 0 or request.striped:
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

    def _spread_prefill_step(self, request: Request) -> tuple[Step, list[Chunk | None]]:
        """A striped request's next chunks, one a group (row g the g-th), each group attending every chunk
        against the blocks it holds (`spread_step`): up to groups x spread_chunk tokens a step."""
        order: list[Chunk | None] = []
        start, length = request.prefilled, request.context_length
        for _ in range(self.groups):
            count = min(length - start, self.shapes.spread_chunk)
            if count <= 0:
                order.append(None)
                continue
            order.append(Chunk(request, start, request.context_tokens(start, start + count),
                               start + count == length and not request.generated))
            start += count
        seq = ShapeSet.bucket(max(len(c.tokens) for c in order if c), self.shapes.spread_tokens(), "tokens")
        step = self._step(1, self.groups, seq, [(request.blocks, c.start, c.tokens) if c else None for c in order],
                          request.keep_logits)
        held = [self._held(request, c.start + len(c.tokens) - 1) if c else {} for c in order]
        width = ShapeSet.bucket(max(-(-blocks_for(start) // self.groups), 2), self.shapes.spread_widths, "blocks")
        step = spread_step(step, held, self.groups, self.blocks.blocks_per_group, width=width)
        step.max_tokens = self.groups * self.shapes.spread_chunk
        return step, order

    def _held(self, request: Request, last: int) -> dict[int, list[tuple[int, int]]]:
        """The blocks of the request's positions 0 .. last each group holds, {group: [(block, first position)]}."""
        held: dict[int, list[tuple[int, int]]] = {}
        for j, block in enumerate(request.blocks[: last // KV_BLOCK + 1]):
            held.setdefault(self.blocks.owner(request.group, j, request.striped), []).append((block, j * KV_BLOCK))
        return held

    def _kv_len(self, tokens: int, end: int) -> int:
        """The attended length of a prefill step whose longest row has `tokens` tokens and whose rows end at
        most at position `end`."""
        return ShapeSet.bucket(max(end, ShapeSet.bucket(tokens, self.shapes.prefill_tokens, "tokens")),
                               self.shapes.prefill_kv(), "attended positions")

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
        spread = any(r.striped for g in per_group for r in g)
        if self.shapes.verify_tokens:
            drafts = [self._draft(r) if r else [] for r in order]
            if any(drafts):
                real = [(r, d) for r, d in zip(order, drafts) if r]
                expected = sum(1 + min(len(d), r.drafter.expected) if d else 1 for r, d in real)
                if self.gate.opens(rows * self.groups, sum(1 + len(d) for _, d in real), len(real), expected):
                    verify = self._spread_verify_step(rows, order, drafts) if spread else \
                        self._verify_step(rows, order, drafts)
                    if verify is not None:
                        return verify, drafts
                for r, d in real:
                    if d:
                        r.drafter.watch(d)
        if spread:
            return self._spread_decode_step(rows, order), None
        step = self._step(rows, bucket, 1,
                          [(r.blocks, r.length - 1, [r.generated[-1]]) if r else None for r in order], False)
        groups = [[(i, r.blocks, r.length - 1) for i, r in enumerate(g)] for g in per_group]
        needed = max(sum(position // KV_BLOCK + 1 for _, _, position in g) for g in groups)
        count = ShapeSet.bucket(needed, tuple(self.shapes.tile_counts(rows, bucket)), "decode tiles")
        step.kv_tiles = decode_tiles(groups, count, self.blocks.blocks_per_group)
        step.kv_len = count * KV_BLOCK
        return (step, order), None

    def _spread_decode_step(self, rows: int, order: list[Request | None]) -> tuple[Step, list[Request | None]]:
        """A decode step holding a striped row: every group attends every group's rows against the blocks it
        holds (`spread_step`), its tiles a bucket of its fullest group's (`ShapeSet.spread_decode_pairs`)."""
        bucket = self.shapes.spread_decode_bucket(rows, sum(r is not None for r in order))
        step = self._step(rows, bucket, 1,
                          [(r.blocks, r.length - 1, [r.generated[-1]]) if r else None for r in order], False)
        held = [self._held(r, r.length - 1) if r else {} for r in order]
        needed = max(sum(len(h.get(g, ())) for h in held) for g in range(self.groups))
        count = ShapeSet.bucket(needed, tuple(self.shapes.tile_counts(rows, bucket)), "decode tiles")
        return spread_step(step, held, self.groups, self.blocks.blocks_per_group, tiles=count), order

    def _spread_verify_step(self, rows: int, order: list[Request | None], drafts: list[list[int]]
                            ) -> tuple[Step, list[Request | None]] | None:
        """A verify step holding a striped row: the decode rows each with its last token and its drafts, every
        group attending every group's rows against the blocks it holds (`spread_step`), its tables a width of
        `spread_widths`; None when one group holds more of a row's blocks than the widest (a row not striped,
        whose whole context lies in its group, longer than a striped row's part)."""
        step, _ = self._verify_step(rows, order, drafts)
        held = [self._held(r, r.length - 1 + len(d)) if r else {} for r, d in zip(order, drafts)]
        needed = max(len(mine) for h in held for mine in h.values())
        if needed > self.shapes.spread_widths[-1]:
            return None
        width = ShapeSet.bucket(max(needed, 2), self.shapes.spread_widths, "blocks")
        return spread_step(step, held, self.groups, self.blocks.blocks_per_group, width=width), order

    def _draft(self, request: Request) -> list[int]:
        """A decoding request's drafts: up to its own adaptive count, none past its new tokens' budget or the
        context, and only into blocks it holds or the pool can spare (speculation never preempts)."""
        if request.drafter is None:
            return []
        room = min(request.drafter.k, self.shapes.verify_tokens - 1, self.shapes.kv_lengths[-1] - request.length,
                   request.sampling.max_new_tokens - len(request.generated) - 1)
        while room > 0 and (request.length - 1 + room) // KV_BLOCK >= len(request.blocks):
            if not self.blocks.grow(request.group, request.blocks, request.striped):
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
