"""The device program: the units nkipy compiles for a NeuronCore, declared in one place.

Each unit is a function of arrays only (weights, KV caches, token ids, positions, cache rows, RoPE tables
and every rank-specific value: expert slots, the MoE union's rows, slice-group positions, vocabulary
offset), with config numbers, shapes, the expert schedule and replica groups as keyword constants. It
returns arrays only, and writes its KV caches in place into its input arrays (nkipy turns such a write
into an aliased output, so the caches stay on the device). `MiniMaxM2Model` runs exactly these units on
CPU, so every accuracy test tests what would be compiled; `program_units` hands any tool the units of one
phase with example inputs, so the whole program can be traced.

A step runs R rows of S tokens in each attention group, passed flat as T = R * S tokens. Every row has
its own positions and its own KV-cache blocks (a paged cache), so one step serves sequences at different lengths:
a decode step (S = 1) over every running request, or a prefill step over chunks of prompts (S = the
chunk). Tokens that only pad a row or the step never reach an expert and write only the cache's scratch
block. No compiled input or output has a dimension of 1 (the Neuron compiler squeezes them): rows come in
buckets of at least 2, tokens are flat, heads and head_dim share one cache axis, and rank values that
could have one entry are padded to two. No 64-bit value enters a unit.

Units: `embedding`; `prefill_layer` or `decode_layer` (one function, traced per phase and shape: the
same program serves all layers, whose weights are its arguments); `lm_head` (final norm of the selected
tokens, vocabulary split over all ranks, the next token of each chosen on the device: greedy, or sampled
from the top candidates; the logits gathered only when asked for); `copy_block` (a cache block copied, for
copy on write of a shared prefix's last block).
"""

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kernels import attention, moe_block, moe_block_parallel, rmsnorm, token_embedding
from kernels.collectives import ReplicaGroups, all_gather, group_size
from kernels.lm_head import gather_vocab, greedy_vocab_parallel, vocab_slice_logits
from kernels.logprobs import logprobs_vocab_parallel
from kernels.sampling import sample_vocab_parallel
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.expert_schedule import ExpertCost, choose_block_rows, rows_apart
from minimax_m2.generation import MAX_LOGPROBS
from minimax_m2.parallel import ParallelLayout
from minimax_m2.sampling import TokenLogprobs
from minimax_m2.weights.model_weights import LAYER_WEIGHT_NAMES, LayerWeights, ModelWeights

KV_BLOCK = 128
# float32 attention scores one layer unit holds at once (per rank): keys are attended in tiles of KV_BLOCK
# times a power of two positions, the largest whose scores fit (`kv_tile_for`)
SCORE_TILE_BYTES = 256 << 20
CANDIDATES = 64  # the device samples among this many most likely tokens (top_k up to this)
TOP_LOGPROBS = MAX_LOGPROBS  # the most likely tokens whose log-probabilities the device returns, when asked


def embedding_unit(input_ids: np.ndarray, embed: np.ndarray) -> np.ndarray:
    """input_ids: [T] int32, embed: [vocab, hidden] -> h [T, hidden]."""
    return token_embedding(input_ids, embed)


def layer_unit(
    h: np.ndarray,
    positions: np.ndarray,
    kv_blocks: np.ndarray,
    token_valid: np.ndarray,
    union_rows: np.ndarray,
    union_member: np.ndarray,
    union_valid: np.ndarray,
    member_slots: np.ndarray,
    own_members: np.ndarray,
    own_position: np.ndarray,
    cos_table: np.ndarray,
    sin_table: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    input_norm: np.ndarray,
    post_norm: np.ndarray,
    wq: np.ndarray,
    wk: np.ndarray,
    wv: np.ndarray,
    wo: np.ndarray,
    q_norm: np.ndarray,
    k_norm: np.ndarray,
    gate: np.ndarray,
    bias: np.ndarray,
    w13: np.ndarray,
    w2: np.ndarray,
    *,
    head_dim: int,
    eps: float,
    top_k: int,
    seq: int,
    block: int,
    kv_len: int,
    kv_tile: int,
    ragged: bool,
    members: int,
    per_token: int,
    own_count: int,
    real_pairs: int,
    capacity: int,
    count_drops: bool,
    block_rows: int,
    rows_apart: bool,
    tp_groups: ReplicaGroups,
    slice_groups: ReplicaGroups,
    ep_groups: ReplicaGroups,
    combine_groups: ReplicaGroups,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One decoder layer: h + attn(norm(h)), then + moe(norm(.)).

    h: [T, hidden], T = R * seq tokens; positions: [T] int32; kv_blocks: a prefill's block tables [>= 2, W]
    int32 (each row's KV-cache blocks), or with `ragged` a decode's tiles [N, 3] int32 (every block its rows
    attend: `kernels.attention.attend_tiles`); token_valid: [T] bool; k/v_cache: [blocks * block, Hkv*D],
    written at each real token's position through its row's blocks (see `kernels.attention`). union_rows,
    union_member [U] int32, union_valid [U] bool (the gathered tokens of this rank's MoE slice group that
    can be real, and which are: padding never reaches an expert), member_slots, own_members, own_position: see
    `kernels.moe_parallel.moe_block_parallel` (on one rank the union is this rank's tokens). real_pairs: how
    many (token, expert) pairs this rank's slice group can have at most (rows padding a bucket have none);
    block_rows: the expert schedule (`minimax_m2.device.expert_schedule`); rows_apart: the attention
    projections' (`kernels.matmul.matmul`); block: KV_BLOCK; kv_tile: cache positions attended at once
    (`kv_tile_for`); ragged: one token per row, attending the tiles in kv_blocks.
    Weights as in `LayerWeights`.
    Returns h; with count_drops (a capacity below the worst case), (h, dropped [2] int32).
    """
    normed = rmsnorm(h, input_norm, eps)
    attend = dict(head_dim=head_dim, eps=eps, block=block, kv_len=kv_len, seq=seq, replica_groups=tp_groups,
                  rows_apart=rows_apart, kv_tile=kv_tile, ragged=ragged)
    weights = (wq, wk, wv, wo, q_norm, k_norm, cos_table, sin_table, k_cache, v_cache)
    if group_size(slice_groups) * group_size(ep_groups) == 1:  # one rank
        h = h + attention(normed, positions, kv_blocks, token_valid, *weights, **attend)
        return h + moe_block(rmsnorm(h, post_norm, eps), token_valid, gate, bias, w13, w2, top_k=top_k,
                             real_pairs=real_pairs, block_rows=block_rows)
    tp = group_size(tp_groups)
    copies = tp if tp > 1 and members >= tp else 1  # the slice group spans whole attention groups
    if copies > 1:  # one exchange for both, and one gathered row per attention group's token
        h, gathered = _attention_gathered(h, attention(normed, positions, kv_blocks, token_valid, *weights, **attend,
                                                       reduce_output=False), post_norm, own_position, eps=eps, tp=tp,
                                          members=members, slice_groups=slice_groups)
    else:
        h = h + attention(normed, positions, kv_blocks, token_valid, *weights, **attend)
        gathered = all_gather(rmsnorm(h, post_norm, eps), 0, slice_groups)
    moe, dropped = moe_block_parallel(
        gathered, union_rows, union_member, union_valid, member_slots, own_members, own_position, gate, bias, w13, w2,
        top_k=top_k, members=members, per_token=per_token, own_count=own_count, real_pairs=real_pairs,
        capacity=capacity, block_rows=block_rows, slice_groups=slice_groups, ep_groups=ep_groups,
        combine_groups=combine_groups, copies=copies,
    )
    return (h + moe, dropped) if count_drops else h + moe


def _attention_gathered(h: np.ndarray, partial: np.ndarray, post_norm: np.ndarray, own_position: np.ndarray, *,
                        eps: float, tp: int, members: int,
                        slice_groups: ReplicaGroups) -> tuple[np.ndarray, np.ndarray]:
    """The attention residual and the MoE's gathered input in one all_gather over the slice group, which
    holds members / tp whole attention groups: each member sends h / tp + its partial output projection, and
    the tp members of a group sum to that group's h + attention (the o_proj all_reduce is not needed).
    Returns (this rank's h + attention [T, hidden], each attention group's normalised tokens
    [members / tp * T, hidden]: the tp members of a group hold the same tokens, so they are kept once). The
    tp partials are summed one at a time in float32, in member order, so that no float32 copy of everything
    gathered is made."""
    tokens, hidden = h.shape
    sent = (h.astype(np.float32) * np.float32(1 / tp) + partial.astype(np.float32)).astype(h.dtype)
    every = all_gather(sent, 0, slice_groups).reshape(members // tp, tp, tokens, hidden)
    total = every[:, 0].astype(np.float32)
    for member in range(1, tp):
        total = total + every[:, member].astype(np.float32)
    groups = total.astype(h.dtype)  # [members / tp, T, hidden]
    normed = rmsnorm(groups, post_norm, eps).reshape(members // tp * tokens, hidden)
    own_group = np.floor(own_position[:1].astype(np.float32) / np.float32(tp)).astype(np.int32)
    return np.take(groups, own_group, axis=0).reshape(tokens, hidden), normed


def copy_unit(k_cache: np.ndarray, v_cache: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One layer's cache entries copied in place: k/v_cache[target] = k/v_cache[source]; source, target:
    [n] int32 flat cache indices (a whole block, copied on write). Returns target[:2]
    (a unit returns an array computed from its inputs)."""
    k_cache[target] = k_cache[source]
    v_cache[target] = v_cache[source]
    return target[:2]


def lm_head_unit(
    h: np.ndarray, selected: np.ndarray, final_norm: np.ndarray, lm_head: np.ndarray, vocab_offset: np.ndarray,
    temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniform: np.ndarray, *,
    eps: float, vocab_size: int, dp: int, tp: int, candidates: int, logprobs: int, return_logits: bool,
    rows_apart: bool, world_groups: ReplicaGroups,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """h: [T, hidden] of this rank's attention group, selected: [n] int32 (the tokens whose next token is
    wanted, e.g. each row's last real token) -> the next token of each selected token of every group,
    ids [N = dp * n] int32, identical on every rank; with logprobs > 0 then also each next token's
    log-probability [N] float32 and the `logprobs` largest [N, logprobs] with their ids [N, logprobs] int32
    (`kernels.logprobs`); with return_logits last the logits [N, vocab] float32. rows_apart: the vocabulary
    projection's schedule (`kernels.matmul.matmul`).

    The groups' selected tokens are gathered over all ranks (the tp copies of a group are identical; the
    first is kept), each rank projects them onto its vocabulary slice lm_head: [hidden, V / W] starting at
    vocab_offset[0], and the next token is chosen from the slices (`kernels.sampling`): greedy where
    temperature [N] is 0, else drawn with top_k [N] (0: none, sampled on the host), top_p [N] and
    uniform [N] in [0, 1). candidates = 0 (a step with no row to sample) leaves the sampling out: every
    row greedy, the sampling inputs unused.
    """
    picked = all_rows(np.take(h, selected, axis=0), dp, tp, world_groups)  # [N, hidden]
    logits = vocab_slice_logits(picked, final_norm, lm_head, vocab_offset, eps=eps, vocab_size=vocab_size,
                                rows_apart=rows_apart)
    ids = greedy_vocab_parallel(logits, vocab_offset, world_groups)
    if candidates:
        ids = sample_vocab_parallel(logits, vocab_offset, ids, temperature, top_k, top_p, uniform,
                                    candidates=candidates, replica_groups=world_groups)
    outputs = (ids,)
    if logprobs:
        outputs += logprobs_vocab_parallel(logits, vocab_offset, ids, top=logprobs, replica_groups=world_groups)
    if return_logits:
        outputs += (gather_vocab(logits, vocab_size, world_groups),)
    return outputs if len(outputs) > 1 else ids


def all_rows(h: np.ndarray, dp: int, tp: int, world_groups: ReplicaGroups) -> np.ndarray:
    """Every attention group's rows [rows, ...] gathered in group order -> [dp * rows, ...]."""
    rows = h.shape[0]
    every = all_gather(h, 0, world_groups).reshape(dp, tp, rows, *h.shape[1:])
    return every[:, 0].reshape(dp * rows, *h.shape[1:])


@dataclass
class Unit:
    """One compiled unit with the inputs of one call: `fn(**inputs, **constants)`."""

    name: str
    fn: Callable[..., Any]
    inputs: dict[str, Any]
    constants: dict[str, Any] = field(default_factory=dict)

    def key(self) -> tuple:
        """What identifies its compiled program: the name, each input's shape and dtype, the constants."""
        shapes = tuple((name, tuple(a.shape), str(a.dtype)) for name, a in self.inputs.items())
        return self.name, shapes, repr(sorted(self.constants.items()))


def run_on_cpu(unit: Unit) -> Any:
    """A unit run as plain NumPy in this process (the model's default runner)."""
    return unit.fn(**unit.inputs, **unit.constants)


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
    uniform: np.ndarray  # float32 in [0, 1): the row's random draw

    @classmethod
    def greedy(cls, n: int) -> "Sampled":
        return cls(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32), np.zeros(n, np.float32))

    def samples_on_device(self) -> bool:
        """Whether any row is drawn on the device (temperature above 0 and a top_k)."""
        return bool(np.any((self.temperature > 0) & (self.top_k > 0)))

    def repeat(self, k: int) -> "Sampled":
        return Sampled(*(np.repeat(a, k) for a in (self.temperature, self.top_k, self.top_p, self.uniform)))

    def padded(self, groups: int) -> "Sampled":
        """Each group's rows padded to at least 2 (as the selected tokens are), the padding greedy."""
        def pad(values: np.ndarray, fill: float) -> np.ndarray:
            per_group = values.reshape(groups, -1)
            extra = max(0, 2 - per_group.shape[1])
            return np.pad(per_group, ((0, 0), (0, extra)), constant_values=fill).reshape(-1)

        return Sampled(pad(self.temperature, 0), pad(self.top_k, 0), pad(self.top_p, 1), pad(self.uniform, 0))


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


def padded(values: np.ndarray) -> np.ndarray:
    """A 1-D int32 array of at least 2 entries (no compiled input has a dimension of 1); extra entries 0."""
    flat = np.asarray(values, np.int32).reshape(-1)
    return np.pad(flat, (0, max(0, 2 - flat.size)))


@dataclass
class RankValues:
    """Rank-specific arrays, passed to the units as data so every rank compiles the same program (each
    padded to at least two entries)."""

    member_slots: np.ndarray  # [M * top_k / tp] int32: for each member of the slice group, the choices it handles
    own_members: np.ndarray  # [A] int32, slice-group positions of the members holding this rank's tokens
    own_position: np.ndarray  # [2] int32, this rank's position in its slice group (first entry)
    vocab_offset: np.ndarray  # [2] int32, its first vocabulary column (first entry)

    @classmethod
    def of(cls, config: MiniMaxM2Config, layout: ParallelLayout) -> "RankValues":
        top_k = config.num_experts_per_tok
        return cls(
            member_slots=padded(np.stack([layout.expert_slots(top_k, r) for r in layout.slice_members()])),
            own_members=padded(layout.own_members()),
            own_position=padded([layout.slice_rank]),
            vocab_offset=padded([layout.rank * layout.vocab_columns(config.vocab_size)]),
        )


def expert_rows(config: MiniMaxM2Config, layout: ParallelLayout, union: int, local_experts: int) -> int:
    """Rows this rank's experts are applied to in a layer whose slice group gathers `union` tokens: the
    pairs themselves, or the received buffer (moe_ep x capacity) when pairs travel between slice groups."""
    if layout.moe_ep == 1:
        return union * (config.num_experts_per_tok // layout.tp)
    return layout.moe_ep * layout.capacity(union, config.num_experts_per_tok, local_experts)


def layer_constants(config: MiniMaxM2Config, layout: ParallelLayout, union: int, seq: int, kv_len: int,
                    local_experts: int, expert_cost: ExpertCost, tokens: int) -> dict[str, Any]:
    """Keyword constants of `layer_unit`; union: the tokens a slice group gathers that can be real; expert_cost:
    the target's cost of one expert over n rows, which chooses the schedules; tokens: the unit's T."""
    top_k = config.num_experts_per_tok
    rows = expert_rows(config, layout, union, local_experts)
    return dict(
        head_dim=config.head_dim, eps=config.rms_norm_eps, top_k=top_k, seq=seq, block=KV_BLOCK, kv_len=kv_len,
        kv_tile=kv_tile_for(tokens, config.num_attention_heads // layout.tp, kv_len), ragged=seq == 1,
        real_pairs=union * top_k // layout.tp,
        members=layout.moe_tp, per_token=top_k // layout.tp, own_count=len(layout.own_members()),
        capacity=layout.capacity(union, top_k, local_experts), count_drops=layout.capacity_factor is not None,
        block_rows=choose_block_rows(rows, local_experts, expert_cost), rows_apart=rows_apart(tokens, expert_cost),
        tp_groups=layout.tp_groups,
        slice_groups=layout.slice_groups, ep_groups=layout.ep_groups, combine_groups=layout.combine_groups,
    )


def lm_head_constants(config: MiniMaxM2Config, layout: ParallelLayout, return_logits: bool,
                      samples: bool = True, logprobs: bool = False, apart: bool = False) -> dict[str, Any]:
    """samples: some row of the step is sampled on the device (else the sampling is traced out); logprobs:
    the step returns its tokens' log-probabilities (and the TOP_LOGPROBS largest); apart: the vocabulary
    projection multiplies its rows one at a time."""
    return dict(eps=config.rms_norm_eps, vocab_size=config.vocab_size, dp=layout.dp, tp=layout.tp,
                candidates=min(CANDIDATES, config.vocab_size) if samples else 0,
                logprobs=min(TOP_LOGPROBS, config.vocab_size) if logprobs else 0, return_logits=return_logits,
                rows_apart=apart, world_groups=layout.world_groups)


def group_rows(step: Step, layout: ParallelLayout) -> slice:
    """This rank's attention group's rows of a step."""
    rows = step.input_ids.shape[0] // layout.dp
    return slice(layout.group * rows, (layout.group + 1) * rows)


def layer_inputs(h: Any, step: Step, layout: ParallelLayout, union: tuple[np.ndarray, np.ndarray, np.ndarray],
                 rank: RankValues, rope: tuple[np.ndarray, np.ndarray], caches: tuple[np.ndarray, np.ndarray],
                 weights: LayerWeights, kv_len: int) -> dict[str, Any]:
    """The array arguments of `layer_unit`, by name (union: `ParallelLayout.union_tokens`; kv_len: the
    positions the step attends, which set its block tables' width)."""
    mine = group_rows(step, layout)
    if step.kv_tiles is not None:
        kv_blocks = step.kv_tiles[layout.group]
    else:
        kv_blocks = step.block_tables[mine][:, :table_width(kv_len)]
        scratch = caches[0].shape[0] // KV_BLOCK - 1
        if len(kv_blocks) < 2:
            padding = np.full((2 - len(kv_blocks), kv_blocks.shape[1]), scratch, np.int32)
            kv_blocks = np.concatenate([kv_blocks, padding])
    inputs = dict(h=h, positions=step.positions[mine].reshape(-1), kv_blocks=np.ascontiguousarray(kv_blocks),
                  token_valid=step.token_valid[mine].reshape(-1), union_rows=union[0], union_member=union[1],
                  union_valid=union[2], member_slots=rank.member_slots, own_members=rank.own_members,
                  own_position=rank.own_position, cos_table=rope[0], sin_table=rope[1], k_cache=caches[0],
                  v_cache=caches[1])
    inputs.update({name: getattr(weights, name) for name in LAYER_WEIGHT_NAMES})
    return inputs


def copy_call(caches: tuple[np.ndarray, np.ndarray], source: np.ndarray, target: np.ndarray) -> Unit:
    return Unit("copy_block", copy_unit, dict(k_cache=caches[0], v_cache=caches[1], source=source, target=target))


def embedding_call(input_ids: np.ndarray, weights: ModelWeights) -> Unit:
    return Unit("embedding", embedding_unit, dict(input_ids=input_ids, embed=weights.embed))


def layer_call(phase: str, inputs: dict[str, Any], constants: dict[str, Any]) -> Unit:
    """The layer unit of 'prefill' or 'decode' with `layer_inputs` and `layer_constants`."""
    return Unit(f"{phase}_layer", layer_unit, inputs, constants)


def lm_head_call(h: Any, step: Step, weights: ModelWeights, rank: RankValues, config: MiniMaxM2Config,
                 layout: ParallelLayout, expert_cost: ExpertCost) -> Unit:
    """The lm_head unit of a step: each of this group's rows' selected tokens (as flat indices into its T
    tokens), and every group's sampling arrays (expert_cost: the target's costs, which choose the
    projection's schedule)."""
    mine = group_rows(step, layout)
    seq, chosen = step.input_ids.shape[1], step.selected.shape[1]
    selected = (np.arange(mine.stop - mine.start, dtype=np.int32)[:, None] * seq + step.selected[mine]).reshape(-1)
    sampled = (step.sampled or Sampled.greedy(step.input_ids.shape[0])).repeat(chosen).padded(layout.dp)
    selected = padded(selected)
    return Unit("lm_head", lm_head_unit,
                dict(h=h, selected=selected, final_norm=weights.final_norm, lm_head=weights.lm_head,
                     vocab_offset=rank.vocab_offset, temperature=sampled.temperature, top_k=sampled.top_k,
                     top_p=sampled.top_p, uniform=sampled.uniform),
                lm_head_constants(config, layout, step.return_logits,
                                  sampled.samples_on_device() or step.logprobs,  # one variant: greedy rows stay so
                                  step.logprobs, rows_apart(layout.dp * selected.size, expert_cost)))


def selected_rows(outputs: np.ndarray, dp: int, selected: int) -> np.ndarray:
    """The lm_head's outputs [dp * n, ...] (n = selected tokens per group, padded to at least 2) -> the
    selected ones [dp * selected, ...]."""
    return outputs.reshape(dp, -1, *outputs.shape[1:])[:, :selected].reshape(dp * selected, *outputs.shape[1:])


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


def tile_bucket(tiles: int, rows: int) -> int:
    """Tiles a decode step of `rows` rows per group runs: a power of two times the rows, holding `tiles`."""
    count = max(2, rows)
    while count < tiles:
        count *= 2
    return count


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


def contiguous_tables(rows: np.ndarray, width: int) -> np.ndarray:
    """Block tables [len(rows), width] giving cache row r the blocks r * width .. (r + 1) * width - 1: the layout
    of `MiniMaxM2Model.forward`, where every row owns a whole context."""
    return (np.asarray(rows, np.int32)[:, None] * np.int32(width) + np.arange(width, dtype=np.int32)).astype(np.int32)


def padding_step(rows: int, bucket: int, seq: int, dp: int, scratch: int, kv_len: int, width: int,
                 max_tokens: int = 0, samples: bool = False, return_logits: bool = False, all_positions: bool = False,
                 logprobs: bool = False) -> Step:
    """A step whose every token is padding, of one shape: runs (compiles, first-touches) that shape's units,
    with the lm_head variant that samples on the device, returns log-probabilities and / or returns logits,
    of the last position of each row or of all of them."""
    total = rows * dp
    zeros = np.zeros((total, seq), np.int32)
    selected = np.tile(np.arange(seq if all_positions else 1, dtype=np.int32), (total, 1))
    tables = None if seq == 1 else np.full((total, width), scratch, np.int32)
    step = Step(zeros, zeros.copy(), tables, np.zeros((total, seq), bool), selected, bucket, kv_len, max_tokens,
                return_logits=return_logits, logprobs=logprobs)
    if seq == 1:  # a decode step attends kv_len // KV_BLOCK tiles, all padding
        step.kv_tiles = decode_tiles([[]] * dp, kv_len // KV_BLOCK, scratch)
    if samples:
        step.sampled = Sampled(np.ones(total, np.float32), np.ones(total, np.int32), np.ones(total, np.float32),
                               np.zeros(total, np.float32))
    return step


def uniform_step(batch: int, seq: int, position: int, layout: ParallelLayout, max_seq_len: int,
                 ids: np.ndarray | None = None, all_positions: bool = True) -> Step:
    """A step of `batch` rows of `seq` tokens all at `position` (row b in cache row b of its group, owning the
    blocks of a whole context, as `MiniMaxM2Model.forward` lays out a batch; padding rows in the scratch
    block, which follows them); ids [batch, seq] (zeros when None)."""
    rows = max(min_rows(seq), layout.rows_per_group(batch))
    total = rows * layout.dp
    selected = np.arange(seq, dtype=np.int32) if all_positions else np.array([seq - 1], np.int32)
    positions = np.broadcast_to(np.arange(position, position + seq, dtype=np.int32), (total, seq)).copy()
    width = table_width(max_seq_len)
    scratch = layout.rows_per_group(batch) * width
    step = Step(np.zeros((total, seq), np.int32), positions, np.full((total, width), scratch, np.int32),
                np.zeros((total, seq), bool), np.broadcast_to(selected, (total, len(selected))).copy(), batch,
                return_logits=True)
    real = batch_rows(batch, layout, seq)
    step.token_valid[real] = True
    step.block_tables[real] = contiguous_tables(real % rows, width)
    if seq == 1:
        groups = [[(int(r % rows), step.block_tables[r].tolist(), position) for r in real if r // rows == g]
                  for g in range(layout.dp)]
        count = tile_bucket(max(map(len, groups)) * (position // KV_BLOCK + 1), rows)
        step.kv_tiles, step.block_tables = decode_tiles(groups, count, scratch), None
        step.kv_len = count * KV_BLOCK
    if ids is not None:
        step.input_ids[real] = ids
    return step


def min_rows(seq: int) -> int:
    """Rows a step of `seq` tokens per row runs at least: 2 for one token per row (its T = rows tokens must
    not be 1: the Neuron compiler squeezes dimensions of size 1), else 1."""
    return 2 if seq == 1 else 1


def batch_rows(batch: int, layout: ParallelLayout, seq: int) -> np.ndarray:
    """The step rows of a batch laid out as `uniform_step` lays it out: batch row b in attention group
    b // n, cache row b % n, with n = rows_per_group(batch), each group running at least min_rows(seq)."""
    per_group = layout.rows_per_group(batch)
    rows = max(min_rows(seq), per_group)
    b = np.arange(batch)
    return (b // per_group) * rows + b % per_group


def program_units(
    config: MiniMaxM2Config,
    layout: ParallelLayout,
    weights: ModelWeights,
    rope: tuple[np.ndarray, np.ndarray],
    expert_cost: ExpertCost,
    *,
    phase: str,
    batch: int,
    seq: int,
    max_seq_len: int,
    position: int = 0,
    samples: bool = True,
    return_logits: bool = False,
    logprobs: bool = False,
) -> list[Unit]:
    """The units one rank runs for one phase ('prefill': `seq` prompt tokens from `position`;
    'decode': one token at `position`), with example inputs of the right shapes, dtypes and values
    (layer 0's weights; every layer runs the same program; every row its own cache row; rows in a bucket
    of at least 2; the next tokens sampled from the top candidates unless not `samples`, their
    log-probabilities returned with `logprobs`, the logits with `return_logits`)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    seq = 1 if phase == "decode" else seq
    dtype = weights.embed.dtype
    shape = cache_shape(config, layout, layout.rows_per_group(batch) * table_width(max_seq_len))
    caches = (np.zeros(shape, dtype), np.zeros(shape, dtype))
    rank = RankValues.of(config, layout)
    ids = (np.arange(batch * seq, dtype=np.int32).reshape(batch, seq) * 7919) % config.vocab_size
    step = uniform_step(batch, seq, position, layout, max_seq_len, ids, all_positions=False)
    total = step.input_ids.shape[0]
    if samples:
        step.sampled = Sampled(np.full(total, 0.7, np.float32), np.full(total, 8, np.int32),
                               np.full(total, 0.9, np.float32), np.linspace(0.05, 0.95, total, dtype=np.float32))
    step.return_logits, step.logprobs = return_logits, logprobs
    mine = group_rows(step, layout)
    h = weights.embed[step.input_ids[mine].reshape(-1)]
    layer = weights.layers[0]
    union, real = layout.union_tokens(step.bucket, step.token_valid, step.max_tokens)
    kv_len = step.kv_len or kv_len_for(step.kv_length, max_seq_len)
    constants = layer_constants(config, layout, real, seq, kv_len, layer.w13.shape[0], expert_cost, h.shape[0])
    return [
        embedding_call(step.input_ids[mine].reshape(-1), weights),
        layer_call(phase, layer_inputs(h, step, layout, union, rank, rope, caches, layer, kv_len), constants),
        lm_head_call(h, step, weights, rank, config, layout, expert_cost),
    ]
