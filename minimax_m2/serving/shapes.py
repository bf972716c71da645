"""The bounded set of step shapes an engine runs (every one a compiled program on a NeuronCore): decode rows
and buckets, prefill rows x tokens, attended lengths and KV tiles, fixed at start-up."""

import itertools
from dataclasses import dataclass

from minimax_m2.device.step import KV_BLOCK, Step, blocks_for, mask_bucket, min_rows, padding_step, spread_chunk


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
    several rows a step up to `several_rows_kv`.

    With `spread_from`, a request whose context reaches that many tokens has its cache striped over the
    attention groups (context parallelism, `kernels.context_parallel`): a plain prefill then attends at most
    the bucket of spread_from positions; a spread prefill step runs one row a group, consecutive chunks of
    `spread_chunk` tokens of the one spread request, its tables `spread_widths` blocks wide (its blocks in
    the fullest group); a decode step holding a spread row runs every group's rows (`spread_decode_pairs`),
    its tiles from `tile_counts`."""

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
    spread_from: int = 0  # context tokens from which a request's cache is spread over the groups (0: never)
    spread_chunk: int = 0  # tokens per group of a spread prefill step (`spread_chunk`)
    spread_widths: tuple[int, ...] = ()  # block-table widths of a spread prefill step, per group

    @classmethod
    def build(cls, groups: int, max_num_seqs: int, prefill_chunk: int, max_seq_len: int,
              max_prefill_rows: int = 4, rows_size_experts: bool = False, speculative: int = 0,
              compiled: bool = True, spread_from: int = 0) -> "ShapeSet":
        """compiled: every shape is a program to compile (a NeuronCore), else steps run as NumPy (this CPU);
        spread_from: see the class (ignored with one attention group, or when no context reaches it)."""
        most = max(min_rows(1), max_num_seqs)
        floor = PREFILL_KV_FLOOR if compiled else KV_BLOCK
        spread_from = spread_from if groups > 1 and 0 < spread_from <= max_seq_len else 0
        widest = -(-blocks_for(max_seq_len) // groups)
        chunk = spread_chunk(prefill_chunk, groups)
        narrowest = min(widest, max(2, blocks_for(chunk))) if compiled else 2
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
            spread_from=spread_from,
            spread_chunk=chunk,
            spread_widths=tuple(powers_of_two(narrowest, widest)) if spread_from else (),
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

    def spread_tokens(self) -> tuple[int, ...]:
        """Token buckets of a spread prefill step's rows: the whole `spread_chunk` where shapes are compiled (a
        short last chunk is padded: one program per width), every prefill bucket up to it on this CPU."""
        if self.compiled:
            return (self.spread_chunk,)
        return tuple(t for t in self.prefill_tokens if t < self.spread_chunk) + (self.spread_chunk,)

    def prefill_kv(self) -> tuple[int, ...]:
        """A plain prefill's attended lengths: up to the bucket of spread_from when longer contexts spread."""
        if not self.spread_from:
            return self.kv_lengths
        return tuple(kv for kv in self.kv_lengths if kv <= self.bucket(self.spread_from, self.kv_lengths, "positions"))

    def spread_decode_pairs(self) -> list[tuple[int, int]]:
        """(rows per group, bucket) of the decode steps holding a spread row: one real row alone (a long
        request decoding by itself, the latency that matters), else all the step's rows."""
        if not self.spread_from:
            return []
        return [(self.decode_rows[0], 1)] + [(r, r * self.groups) for r in self.decode_rows]

    def spread_decode_bucket(self, rows: int, real: int) -> int:
        """The bucket of a decode step of `rows` rows per group, `real` of them real, holding a spread row."""
        return 1 if real == 1 and rows == self.decode_rows[0] else rows * self.groups

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
        decode rows, each with its drafts) has a prefill's shape, every row of it real; a spread step
        ('spread_prefill', 'spread_decode') attends KV_BLOCK x its widths or tiles in each group, every row
        of it counted real."""
        decode = [("decode", r, b, 1, n * KV_BLOCK) for r, b in self.decode_pairs() for n in self.tile_counts(r, b)]
        prefill = [("prefill", r, r * self.groups, t, kv) for r in self.prefill_rows for t in self.prefill_tokens
                   for kv in self.prefill_kv() if kv >= t and self.holds(r, t, kv)]
        verify = [("verify", r, r * self.groups, self.verify_tokens, kv) for r in self.decode_rows
                  for kv in self.kv_lengths if self.verify_tokens]
        spread = [("spread_prefill", 1, self.groups, t, w * KV_BLOCK) for t in self.spread_tokens()
                  for w in self.spread_widths]
        spread += [("spread_decode", r, b, 1, n * KV_BLOCK) for r, b in self.spread_decode_pairs()
                   for n in self.tile_counts(r, b)]
        if self.verify_tokens:
            spread += [("spread_verify", r, r * self.groups, self.verify_tokens, w * KV_BLOCK) for r in self.decode_rows
                       for w in self.spread_widths]
        return decode + prefill + verify + spread

    def padding_steps(self, scratch: int, width: int, keep_logits: bool, vocab: int) -> list[Step]:
        """A padding step (`padding_step`: cache rows in the scratch block, tables `width` wide) of each shape
        with each lm_head variant: sampling on the device or not, with logits or not, sampling with
        log-probabilities, and for a prefill, with the logits of every position (with keep_logits); a verify
        step with every position's ids, and with their logits; and once for each decode row count, each
        sampling variant with grammar masks (over `vocab` tokens) of each bucket up to its rows (a prefill's
        constrained rows choose their token on the host)."""
        chunk = {"decode": 0, "prefill": self.prefill_chunk, "verify": 0, "spread_decode": 0,
                 "spread_prefill": self.groups * self.spread_chunk, "spread_verify": 0}
        variants = {"decode": [(s, logits, False, False) for s, logits in itertools.product((False, True), repeat=2)]
                    + [(True, False, False, True)]}
        variants["prefill"] = [variant for variant in variants["decode"] if variant[0]]  # a prefill may always sample
        variants["verify"] = [(True, False, True, False), (True, True, True, False)]  # every position's ids (logits)
        variants["spread_decode"], variants["spread_prefill"] = variants["decode"], variants["prefill"]
        variants["spread_verify"] = variants["verify"]
        steps, heads = [], set()
        for phase, rows, bucket, seq, kv in self.shapes():
            rows = max(min_rows(seq), rows)
            shape = (rows, bucket, seq, self.groups, scratch, kv, width, chunk[phase])
            spread = phase.startswith("spread")
            steps += [padding_step(*shape, *variant, spread=spread) for variant in variants[phase]]
            if keep_logits and phase in ("prefill", "spread_prefill"):
                steps.append(padding_step(*shape, True, True, True, False, spread=spread))
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
