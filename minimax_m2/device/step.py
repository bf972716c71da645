"""The host's side of a device step: what a step carries (`Step`, `Sampled`, `StepOutput`), the KV cache's
geometry (blocks of KV_BLOCK positions, block tables, decode tiles, the attended lengths) and the steps
built whole: a padding step of one shape (warm-up) and a uniform batch (`MiniMaxM2Model.forward`).

Every array a step carries is an input of the units in `minimax_m2.device.program`, rank-identical in
shape; nothing here runs on the device.
"""

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.parallel import ParallelLayout
from minimax_m2.sampling import TokenLogprobs

KV_BLOCK = 128

# float32 attention scores one layer unit holds at once (per rank): keys are attended in tiles of KV_BLOCK
# times a power of two positions, the largest whose scores fit (`kv_tile_for`)
SCORE_TILE_BYTES = 256 << 20


def kv_tile_for(tokens: int, q_heads: int, kv_len: int) -> int:
    """Cache positions a layer unit of `tokens` query tokens (q_heads heads on this rank) attends at once: the
    largest KV_BLOCK x 2^k dividing kv_len whose float32 scores [tokens, q_heads, tile] stay within
    SCORE_TILE_BYTES (at least KV_BLOCK, or kv_len when shorter)."""
    tile = kv_len
    while tile > KV_BLOCK and tile % 2 == 0 and tokens * q_heads * tile * 4 > SCORE_TILE_BYTES:
        tile //= 2
    return tile


def kv_len_for(length: int, max_seq_len: int) -> int:
    """Cache positions attended when the longest row has `length` tokens: KV_BLOCK times a power of two
    (one compiled program per length, few lengths in all), at most max_seq_len."""
    kv = KV_BLOCK
    while kv < length:
        kv *= 2
    return min(max_seq_len, kv)


@dataclass
class Sampled:
    """How each selected token's successor is chosen, per row of the lm_head's output ([N] each)."""

    temperature: np.ndarray  # float32, 0: greedy
    top_k: np.ndarray  # int32, 0: none (the device then leaves the row to the host)
    top_p: np.ndarray  # float32, 1: none
    uniform: np.ndarray  # float32 in [0, 1): the row's random draw, or [N, k] one for each of its k selected tokens

    @classmethod
    def greedy(cls, n: int) -> "Sampled":
        return cls(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32), np.zeros(n, np.float32))

    def samples_on_device(self) -> bool:
        """Whether any row is drawn on the device (temperature above 0 and a top_k)."""
        return bool(np.any((self.temperature > 0) & (self.top_k > 0)))

    def repeat(self, k: int) -> "Sampled":
        """Per selected token ([N * k] each), each row's k selected tokens in turn: the row's settings k times,
        and its draws as they are when it has one for each ([N, k]), else its one draw k times."""
        uniform = self.uniform.reshape(-1) if self.uniform.ndim == 2 else np.repeat(self.uniform, k)
        return Sampled(*(np.repeat(a, k) for a in (self.temperature, self.top_k, self.top_p)), uniform)

    def padded(self, groups: int, picks: np.ndarray | None = None, least: int = 2) -> "Sampled":
        """Each group's entries (or only those at its `picks`, [groups, n] indices, as `head_picks` gives
        them) padded to at least `least` (as the selected tokens are), the padding greedy."""
        def pad(values: np.ndarray, fill: float) -> np.ndarray:
            return picked(values.reshape(groups, -1), picks, least, fill)

        return Sampled(pad(self.temperature, 0), pad(self.top_k, 0), pad(self.top_p, 1), pad(self.uniform, 0))


@dataclass
class Spread:
    """Where a step's tokens and blocks are when its sequences' caches are spread over the attention groups
    (context parallelism): each group attends every group's rows against the blocks it holds."""

    written: np.ndarray  # [dp, dp * T] int32: where group g's cache takes each gathered token's K/V (else scratch)
    tables: np.ndarray | None = None  # [dp, dp * R, W] int32 (prefill): group g's blocks of each gathered row
    starts: np.ndarray | None = None  # [dp, dp * R, W] int32: their first positions (FAR: padding)


@dataclass
class Step:
    """The host's description of one step, for every attention group's rows (arrays [dp * R, ...]).

    Row r of the step belongs to attention group r // R and reads and writes its positions through its
    block table, block_tables[r] (cache blocks of that group's cache: positions p .. p + KV_BLOCK - 1 in
    block block_tables[r, p // KV_BLOCK]; padding rows name the scratch block). A decode step (one token a
    row) carries instead each group's tiles, kv_tiles[g]: (row within the group, block, its first position)
    for every block its rows attend, padded with scratch tiles that see nothing. At most `bucket` rows of
    the step are real (a bucket of one row still runs two: no compiled shape has a dimension of 1)."""

    input_ids: np.ndarray  # [dp * R, S] int32
    positions: np.ndarray  # [dp * R, S] int32 (padding tokens at any position inside the cache)
    block_tables: np.ndarray | None  # [dp * R, W] int32, W * KV_BLOCK >= every position attended (prefill)
    token_valid: np.ndarray  # [dp * R, S] bool
    selected: np.ndarray  # [dp * R, K] int32: positions within each row whose next token is wanted
    bucket: int  # at most this many rows are real
    kv_len: int | None = None  # positions attended (default: the bucket of the longest real row)
    max_tokens: int = 0  # at most this many tokens are real in all (0: bucket x S), e.g. a prefill's chunk
    sampled: Sampled | None = None  # per row ([dp * R]); None: greedy
    return_logits: bool = False  # bring the logits of the selected tokens to the host
    logprobs: bool = False  # bring their next tokens' log-probabilities (and the TOP_LOGPROBS largest) to the host
    kv_tiles: np.ndarray | None = None  # [dp, N, 3] int32: each group's decode tiles (decode)
    # the allowed tokens of constrained rows, bit-packed over the whole vocabulary [M, ceil(V / 32)] int32 (M a
    # `mask_bucket`), or a Future of them (resolved when the lm_head runs: they may be computed meanwhile)
    masks: np.ndarray | Future | None = None
    mask_index: np.ndarray | None = None  # [dp * R] int32: each row's mask in masks (-1: free)
    spread: Spread | None = None  # the rows' blocks lie in several groups (then kv_tiles name gathered rows)

    def resolved_masks(self) -> np.ndarray | None:
        """The masks, waiting for them if they are still being computed."""
        if isinstance(self.masks, Future):
            self.masks = self.masks.result()
        return self.masks

    @property
    def kv_length(self) -> int:
        """Positions the longest real row reaches (its last position + 1)."""
        return int(np.max(np.where(self.token_valid, self.positions + 1, 1)))


@dataclass
class StepOutput:
    """What a step brings to the host, for each row's selected tokens."""

    ids: np.ndarray  # [rows, K] int32: each selected token's next token
    logits: np.ndarray | None = None  # [rows, K, vocab] float32, when the step asked for them
    logprobs: tuple[np.ndarray, ...] | None = None  # the next tokens' [rows, K], the largest [rows, K, TOP_LOGPROBS]
    # and their ids [rows, K, TOP_LOGPROBS], when the step asked for them

    def scored(self, row: int, k: int, top: int) -> TokenLogprobs | None:
        """Row `row`'s k-th next token's log-probability and the `top` largest with their ids (None when the
        step did not ask for them)."""
        if self.logprobs is None:
            return None
        chosen, values, ids = (a[row, k] for a in self.logprobs)
        return float(chosen), [(int(i), float(v)) for i, v in zip(ids[:top], values[:top])]


def mask_words(vocab: int) -> int:
    """int32 words of one row's bit-packed mask over `vocab` tokens."""
    return -(-vocab // 32)


def padded(values: np.ndarray, least: int = 2) -> np.ndarray:
    """A 1-D int32 array of at least `least` entries (2: no compiled input has a dimension of 1); extra
    entries 0."""
    flat = np.asarray(values, np.int32).reshape(-1)
    return np.pad(flat, (0, max(0, least - flat.size)))


def picked(per_group: np.ndarray, picks: np.ndarray | None, least: int, fill: float) -> np.ndarray:
    """Each group's entries [groups, m] (or only those at its `picks`, `head_picks`), padded with `fill` to
    at least `least` a group -> [groups * max(n, least)]."""
    if picks is not None:
        per_group = np.take_along_axis(per_group, np.maximum(picks, 0), axis=1)
    return np.pad(per_group, ((0, 0), (0, max(0, least - per_group.shape[1]))), constant_values=fill).reshape(-1)


def group_rows(step: Step, layout: ParallelLayout) -> slice:
    """This rank's attention group's rows of a step."""
    rows = step.input_ids.shape[0] // layout.dp
    return slice(layout.group * rows, (layout.group + 1) * rows)


def selected_rows(outputs: np.ndarray, dp: int, rows: int, chosen: int, picks: np.ndarray | None = None
                  ) -> np.ndarray:
    """The lm_head's outputs [dp * n, ...] (n: each group's selected tokens, `chosen` a row, padded to at
    least 2; or only those at its `picks`, `head_picks`, unpadded) -> [dp * rows, chosen, ...], zeros for
    the selected tokens left out."""
    inner = outputs.shape[1:]
    per_group = outputs.reshape(dp, -1, *inner)
    if picks is None:
        return per_group[:, :rows * chosen].reshape(dp * rows, chosen, *inner)
    every = np.zeros((dp, rows * chosen, *inner), outputs.dtype)
    for group in range(dp):
        real = picks[group] >= 0
        every[group, picks[group][real]] = per_group[group, :picks.shape[1]][real]
    return every.reshape(dp * rows, chosen, *inner)


def head_picks(step: "Step", dp: int) -> np.ndarray:
    """Which selected tokens the lm_head takes where nothing is compiled: the real ones (a padding row's,
    and a verify row's positions past its drafts, are left out). [dp, n] indices into each group's rows x
    K selected tokens, n the most of any group (at least 1), -1 padding a group with fewer."""
    rows, chosen = step.selected.shape
    real = np.take_along_axis(step.token_valid, step.selected, axis=1).reshape(dp, rows // dp * chosen)
    picks = np.full((dp, max(1, int(real.sum(axis=1).max()))), -1, np.int64)
    for group in range(dp):
        found = np.flatnonzero(real[group])
        picks[group, :found.size] = found
    return picks


def cache_shape(config: MiniMaxM2Config, layout: ParallelLayout, blocks: int) -> tuple[int, ...]:
    """One layer's K (or V) cache on one rank: `blocks` blocks of KV_BLOCK positions plus the scratch block,
    this rank's KV heads x head_dim."""
    return ((blocks + 1) * KV_BLOCK, config.num_key_value_heads // layout.tp * config.head_dim)


def blocks_for(positions: int) -> int:
    """Cache blocks that hold `positions` positions."""
    return -(-positions // KV_BLOCK)


def table_width(positions: int) -> int:
    """Block-table columns of a step attending `positions` positions (at least 2: no compiled input has a
    dimension of 1)."""
    return max(2, blocks_for(positions))


FAR = 1 << 30  # the first position of a padding tile: past every row's, so it sees nothing


def mask_bucket(count: int, rows: int) -> int:
    """Masks a step of `rows` rows carries for `count` constrained ones: 2, 8, 32, .. (a power of four times two,
    few lm_head programs), at most the rows' `power_bucket`."""
    bucket = 2
    while bucket < count:
        bucket *= 4
    return min(bucket, power_bucket(rows))


def power_bucket(count: int) -> int:
    """The bucket holding `count` (e.g. the tiles a decode step runs): a power of two, at least 2."""
    bucket = 2
    while bucket < count:
        bucket *= 2
    return bucket


def decode_tiles(groups: list[list[tuple[int, list[int], int]]], count: int, scratch: int) -> np.ndarray:
    """[len(groups), count, 3] int32: each group's tiles (`Step.kv_tiles`) from its rows as (row within the
    group, block table, position fed): the blocks of positions 0 .. position, then padding tiles."""
    tiles = np.tile(np.array([0, scratch, FAR], np.int32), (len(groups), count, 1))
    for g, rows in enumerate(groups):
        mine = [(row, blocks[b], b * KV_BLOCK) for row, blocks, position in rows
                for b in range(position // KV_BLOCK + 1)]
        if len(mine) > count:
            raise ValueError(f"{len(mine)} tiles exceed the step's {count}")
        if mine:
            tiles[g, : len(mine)] = mine
    return tiles


# A spread prefill step (one request's consecutive chunks, one an attention group) holds at most this many
# prefill chunks' tokens in all: its experts' pair buffers grow with them (at 4 chunks of 2048 the real
# model's activations stay within 3 GiB a rank; benchmarks/roofline.py, section 5)
SPREAD_CHUNKS = 4


def spread_chunk(prefill_chunk: int, groups: int) -> int:
    """Tokens per attention group of a spread prefill step: a prefill chunk, fewer over more than SPREAD_CHUNKS
    groups."""
    return max(1, min(prefill_chunk, SPREAD_CHUNKS * prefill_chunk // groups))


def spread_step(step: Step, held: list[dict[int, list[tuple[int, int]]]], dp: int, scratch: int,
                tiles: int = 0, width: int = 0) -> Step:
    """The step with its sequences' caches spread over the attention groups (`Spread`): held[r], for each of
    its dp * R rows, the blocks of that row's sequence each group holds, {group: [(block, first position)]}
    (every block up to the row's last position, the ones the step writes included; {} for a padding row).
    A decode step's tiles (`kv_tiles`, naming gathered rows) number `tiles` per group, a prefill's tables
    are `width` blocks wide (default: the power-of-two bucket of the fullest group)."""
    rows, seq = step.input_ids.shape
    positions = step.positions.reshape(-1)
    written = np.tile(np.int32(scratch * KV_BLOCK) + positions % np.int32(KV_BLOCK), (dp, 1))
    for r, blocks in enumerate(held):
        where = {first: (g, b) for g, mine in blocks.items() for b, first in mine}
        for t in np.flatnonzero(step.token_valid[r]) + r * seq:
            g, b = where[int(positions[t]) // KV_BLOCK * KV_BLOCK]
            written[g, t] = b * KV_BLOCK + positions[t] % KV_BLOCK
    step.spread = Spread(written)
    by_group = [[(r, b, first) for r, blocks in enumerate(held) for b, first in blocks.get(g, [])] for g in range(dp)]
    if seq == 1:
        count = tiles or power_bucket(max(map(len, by_group)))
        step.kv_tiles = np.tile(np.array([0, scratch, FAR], np.int32), (dp, count, 1))
        for g, mine in enumerate(by_group):
            if len(mine) > count:
                raise ValueError(f"{len(mine)} tiles exceed the step's {count}")
            if mine:
                step.kv_tiles[g, : len(mine)] = mine
        step.kv_len = count * KV_BLOCK
    else:
        width = width or power_bucket(max([len(mine) for blocks in held for mine in blocks.values()], default=1))
        tables = np.full((dp, rows, width), scratch, np.int32)
        starts = np.full((dp, rows, width), FAR, np.int32)
        for r, blocks in enumerate(held):
            for g, mine in blocks.items():
                if len(mine) > width:
                    raise ValueError(f"{len(mine)} blocks exceed the step's tables of {width}")
                tables[g, r, : len(mine)] = [b for b, _ in mine]
                starts[g, r, : len(mine)] = [first for _, first in mine]
        step.spread.tables, step.spread.starts = tables, starts
        step.kv_len = width * KV_BLOCK
    step.block_tables = None
    return step


def striped(step: Step, dp: int, width: int, scratch: int) -> Step:
    """A step laid out by `uniform_step` (real row r owning cache blocks (r % R) * width ..), with each real row's
    sequence striped over the attention groups instead: its j-th block in group j % dp, as block
    (r % R) * width + j // dp there (`spread_step`)."""
    rows = step.input_ids.shape[0] // dp
    held: list[dict[int, list[tuple[int, int]]]] = []
    for r, valid in enumerate(step.token_valid):
        mine: dict[int, list[tuple[int, int]]] = {}
        if valid.any():
            for j in range(int(np.max(step.positions[r][valid])) // KV_BLOCK + 1):
                mine.setdefault(j % dp, []).append(((r % rows) * width + j // dp, j * KV_BLOCK))
        held.append(mine)
    return spread_step(step, held, dp, scratch)


def contiguous_tables(rows: np.ndarray, width: int) -> np.ndarray:
    """Block tables [len(rows), width] giving cache row r the blocks r * width .. (r + 1) * width - 1: the layout
    of `MiniMaxM2Model.forward`, where every row owns a whole context."""
    return (np.asarray(rows, np.int32)[:, None] * np.int32(width) + np.arange(width, dtype=np.int32)).astype(np.int32)


def padding_step(rows: int, bucket: int, seq: int, dp: int, scratch: int, kv_len: int, width: int,
                 max_tokens: int = 0, samples: bool = False, return_logits: bool = False, all_positions: bool = False,
                 logprobs: bool = False, masks: int = 0, vocab: int = 0, spread: bool = False) -> Step:
    """A step whose every token is padding, of one shape: runs (compiles, first-touches) that shape's units,
    with the lm_head variant that samples on the device, returns log-probabilities and / or returns logits,
    of the last position of each row or of all of them, with `masks` grammar masks over `vocab` tokens; with
    `spread`, its caches spread over the groups (`spread_step`)."""
    total = rows * dp
    zeros = np.zeros((total, seq), np.int32)
    selected = np.tile(np.arange(seq if all_positions else 1, dtype=np.int32), (total, 1))
    tables = None if seq == 1 else np.full((total, width), scratch, np.int32)
    step = Step(zeros, zeros.copy(), tables, np.zeros((total, seq), bool), selected, bucket, kv_len, max_tokens,
                return_logits=return_logits, logprobs=logprobs)
    if seq == 1:  # a decode step attends kv_len // KV_BLOCK tiles, all padding
        step.kv_tiles = decode_tiles([[]] * dp, kv_len // KV_BLOCK, scratch)
    if spread:
        step = spread_step(step, [{}] * total, dp, scratch, tiles=kv_len // KV_BLOCK, width=kv_len // KV_BLOCK)
    if samples:
        step.sampled = Sampled(np.ones(total, np.float32), np.ones(total, np.int32), np.ones(total, np.float32),
                               np.zeros(total, np.float32))
    if masks:
        step.masks = np.full((masks, mask_words(vocab)), -1, np.int32)
        step.mask_index = np.zeros(total, np.int32)
    return step


def uniform_step(batch: int, seq: int, position: int, layout: ParallelLayout, max_seq_len: int,
                 ids: np.ndarray | None = None, all_positions: bool = True, rows: int | None = None) -> Step:
    """A step of `batch` rows of `seq` tokens all at `position` (row b in cache row b of its group, owning the
    blocks of a whole context, as `MiniMaxM2Model.forward` lays out a batch; padding rows in the scratch
    block, which follows them); ids [batch, seq] (zeros when None); rows: per group (default: the batch's,
    `batch_rows`; more, as the serving engine's decode steps run)."""
    rows = max(min_rows(seq), rows or layout.rows_per_group(batch))
    total = rows * layout.dp
    selected = np.arange(seq, dtype=np.int32) if all_positions else np.array([seq - 1], np.int32)
    positions = np.broadcast_to(np.arange(position, position + seq, dtype=np.int32), (total, seq)).copy()
    width = table_width(max_seq_len)
    scratch = layout.rows_per_group(batch) * width
    step = Step(np.zeros((total, seq), np.int32), positions, np.full((total, width), scratch, np.int32),
                np.zeros((total, seq), bool), np.broadcast_to(selected, (total, len(selected))).copy(), batch,
                return_logits=True)
    real = batch_rows(batch, layout, seq, rows)
    step.token_valid[real] = True
    step.block_tables[real] = contiguous_tables(real % rows, width)
    if seq == 1:
        groups = [[(int(r % rows), step.block_tables[r].tolist(), position) for r in real if r // rows == g]
                  for g in range(layout.dp)]
        count = power_bucket(max(map(len, groups)) * (position // KV_BLOCK + 1))
        step.kv_tiles, step.block_tables = decode_tiles(groups, count, scratch), None
        step.kv_len = count * KV_BLOCK
    if ids is not None:
        step.input_ids[real] = ids
    return step


def min_rows(seq: int) -> int:
    """Rows a step of `seq` tokens per row runs at least: 2 for one token per row (its T = rows tokens must
    not be 1: the Neuron compiler squeezes dimensions of size 1), else 1."""
    return 2 if seq == 1 else 1


def batch_rows(batch: int, layout: ParallelLayout, seq: int, rows: int | None = None) -> np.ndarray:
    """The step rows of a batch laid out as `uniform_step` lays it out: batch row b in attention group
    b // n, cache row b % n, with n = rows_per_group(batch), each group running at least min_rows(seq) rows
    (or `rows`)."""
    per_group = layout.rows_per_group(batch)
    rows = max(min_rows(seq), rows or per_group)
    b = np.arange(batch)
    return (b // per_group) * rows + b % per_group
