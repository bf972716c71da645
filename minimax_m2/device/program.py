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
copy on write of a shared prefix's last block). What a step carries, and the KV cache's blocks, tables and
tiles, are in `minimax_m2.device.step`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernels import attention, moe_block, moe_block_parallel, rmsnorm, token_embedding
from kernels.collectives import ReplicaGroups, all_gather, all_reduce, all_to_all, group_size
from kernels.lm_head import gather_vocab, greedy_vocab_parallel, vocab_slice_logits
from kernels.logprobs import logprobs_vocab_parallel
from kernels.sampling import sample_vocab_parallel
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.expert_schedule import ExpertCost, choose_block_rows, rows_apart
from minimax_m2.device.step import (
    KV_BLOCK,
    Sampled,
    Step,
    cache_shape,
    group_rows,
    kv_len_for,
    kv_tile_for,
    padded,
    table_width,
    uniform_step,
)
from minimax_m2.generation import MAX_LOGPROBS
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.model_weights import LAYER_WEIGHT_NAMES, LayerWeights, ModelWeights

# a step of at least this many tokens per attention group sends its attention output to the MoE through the
# tp group first (`_attention_gathered`): below it the exchange's latency outweighs the bytes it saves
SCATTER_TOKENS = 16

CANDIDATES = 64  # the device samples among this many most likely tokens (top_k up to this)

TOP_LOGPROBS = MAX_LOGPROBS  # the most likely tokens whose log-probabilities the device returns, when asked


def embedding_unit(input_ids: np.ndarray, embed: np.ndarray, embed_offset: np.ndarray, *,
                   tp_groups: ReplicaGroups) -> np.ndarray:
    """input_ids: [T] int32 (this attention group's tokens), embed: [V / tp, hidden] this rank's rows of the
    table (the vocabulary split over the attention group's tp ranks: from embed_offset[0]) -> h [T, hidden]
    on every rank of the group: each rank looks up the ids in its rows, zero for the others', and the
    group's rows are summed (exactly: one of them is not zero)."""
    local = input_ids - embed_offset[:1]
    mine = (local >= 0) & (local < np.int32(embed.shape[0]))
    rows = token_embedding(np.where(mine, local, 0), embed)
    return all_reduce(np.where(mine[:, None], rows, np.zeros_like(rows[:1])), tp_groups)


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
    w13_scale: np.ndarray | None = None,
    w2_scale: np.ndarray | None = None,
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
    scatter: bool,
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
    (`kv_tile_for`); ragged: one token per row, attending the tiles in kv_blocks; scatter: how the attention
    output reaches the MoE when a slice group spans whole attention groups (`_attention_gathered`).
    Weights as in `LayerWeights`: with FP8 experts (w13_scale and w2_scale given), w13 and w2 hold
    float8_e4m3fn codes, each expert dequantised where it is read (`kernels.moe_grouped`).
    Returns h; with count_drops (a capacity below the worst case), (h, dropped [2] int32).
    """
    scales = None if w13_scale is None else (w13_scale, w2_scale)
    normed = rmsnorm(h, input_norm, eps)
    attend = dict(head_dim=head_dim, eps=eps, block=block, kv_len=kv_len, seq=seq, replica_groups=tp_groups,
                  rows_apart=rows_apart, kv_tile=kv_tile, ragged=ragged)
    weights = (wq, wk, wv, wo, q_norm, k_norm, cos_table, sin_table, k_cache, v_cache)
    if group_size(slice_groups) * group_size(ep_groups) == 1:  # one rank
        h = h + attention(normed, positions, kv_blocks, token_valid, *weights, **attend)
        return h + moe_block(rmsnorm(h, post_norm, eps), token_valid, gate, bias, w13, w2, top_k=top_k,
                             real_pairs=real_pairs, block_rows=block_rows, scales=scales)
    tp = group_size(tp_groups)
    copies = tp if tp > 1 and members >= tp else 1  # the slice group spans whole attention groups
    if copies > 1:  # one exchange for both, and one gathered row per attention group's token
        h, gathered = _attention_gathered(h, attention(normed, positions, kv_blocks, token_valid, *weights, **attend,
                                                       reduce_output=False), post_norm, own_position, eps=eps, tp=tp,
                                          members=members, scatter=scatter, tp_groups=tp_groups,
                                          slice_groups=slice_groups)
    else:
        h = h + attention(normed, positions, kv_blocks, token_valid, *weights, **attend)
        gathered = all_gather(rmsnorm(h, post_norm, eps), 0, slice_groups)
    moe, dropped = moe_block_parallel(
        gathered, union_rows, union_member, union_valid, member_slots, own_members, own_position, gate, bias, w13, w2,
        top_k=top_k, members=members, per_token=per_token, own_count=own_count, real_pairs=real_pairs,
        capacity=capacity, block_rows=block_rows, slice_groups=slice_groups, ep_groups=ep_groups,
        combine_groups=combine_groups, copies=copies, scales=scales,
    )
    return (h + moe, dropped) if count_drops else h + moe


def _attention_gathered(h: np.ndarray, partial: np.ndarray, post_norm: np.ndarray, own_position: np.ndarray, *,
                        eps: float, tp: int, members: int, scatter: bool, tp_groups: ReplicaGroups,
                        slice_groups: ReplicaGroups) -> tuple[np.ndarray, np.ndarray]:
    """The attention residual and the MoE's gathered input, from the slice group, which holds members / tp
    whole attention groups: each member's h / tp + its partial output projection, summed over the tp members
    of its group, is that group's h + attention (the o_proj all_reduce is not needed).

    Either every member's whole sum is gathered over the slice group and each group's tp sums are added
    here (one exchange of members x T rows: the fewest collectives, what a small step's latency wants), or
    with `scatter` (T at least SCATTER_TOKENS and divisible by tp) an all_to_all over the tp group first
    gives each member the tp sums of its T / tp rows, added here, and these are gathered (members x T / tp
    rows: a tp-th of the bytes and of the buffer, one more collective). Both add the same values in the
    same order: the same bits.
    Returns (this rank's h + attention [T, hidden], each attention group's normalised tokens
    [members / tp * T, hidden]: the tp members of a group hold the same tokens, so they are kept once)."""
    tokens, hidden = h.shape
    sent = (h.astype(np.float32) * np.float32(1 / tp) + partial.astype(np.float32)).astype(h.dtype)
    if scatter:
        mine = _sum_members(all_to_all(sent, 0, 0, tp_groups).reshape(tp, tokens // tp, hidden)).astype(h.dtype)
        groups = all_gather(mine, 0, slice_groups).reshape(members // tp, tokens, hidden)
    else:
        every = all_gather(sent, 0, slice_groups).reshape(members // tp, tp, tokens, hidden)
        groups = _sum_members(np.swapaxes(every, 0, 1)).astype(h.dtype)
    normed = rmsnorm(groups, post_norm, eps).reshape(members // tp * tokens, hidden)
    own_group = np.floor(own_position[:1].astype(np.float32) / np.float32(tp)).astype(np.int32)
    return np.take(groups, own_group, axis=0).reshape(tokens, hidden), normed


def _sum_members(parts: np.ndarray) -> np.ndarray:
    """parts [tp, ...] summed over the first axis in float32, one member at a time, in member order (no float32
    copy of all of them is made)."""
    total = parts[0].astype(np.float32)
    for member in range(1, parts.shape[0]):
        total = total + parts[member].astype(np.float32)
    return total


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


@dataclass
class RankValues:
    """Rank-specific arrays, passed to the units as data so every rank compiles the same program (each
    padded to at least two entries)."""

    member_slots: np.ndarray  # [M * top_k / tp] int32: for each member of the slice group, the choices it handles
    own_members: np.ndarray  # [A] int32, slice-group positions of the members holding this rank's tokens
    own_position: np.ndarray  # [2] int32, this rank's position in its slice group (first entry)
    vocab_offset: np.ndarray  # [2] int32, its first vocabulary column (first entry)
    embed_offset: np.ndarray  # [2] int32, its first embedding row (first entry)

    @classmethod
    def of(cls, config: MiniMaxM2Config, layout: ParallelLayout) -> "RankValues":
        top_k = config.num_experts_per_tok
        return cls(
            member_slots=padded(np.stack([layout.expert_slots(top_k, r) for r in layout.slice_members()])),
            own_members=padded(layout.own_members()),
            own_position=padded([layout.slice_rank]),
            vocab_offset=padded([layout.rank * layout.vocab_columns(config.vocab_size)]),
            embed_offset=padded([layout.tp_rank * layout.embed_rows(config.vocab_size)]),
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
        scatter=tokens % layout.tp == 0 and tokens >= SCATTER_TOKENS, tp_groups=layout.tp_groups,
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
    inputs.update({name: getattr(weights, name) for name in LAYER_WEIGHT_NAMES if getattr(weights, name) is not None})
    return inputs


def copy_call(caches: tuple[np.ndarray, np.ndarray], source: np.ndarray, target: np.ndarray) -> Unit:
    return Unit("copy_block", copy_unit, dict(k_cache=caches[0], v_cache=caches[1], source=source, target=target))


def embedding_call(input_ids: np.ndarray, weights: ModelWeights, rank: RankValues, layout: ParallelLayout) -> Unit:
    return Unit("embedding", embedding_unit, dict(input_ids=input_ids, embed=weights.embed,
                                                  embed_offset=rank.embed_offset),
                dict(tp_groups=layout.tp_groups))


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
                                  # one variant: greedy rows stay so; a prefill always may sample (it costs little
                                  # beside the chunk, and halves its lm_head programs)
                                  seq > 1 or sampled.samples_on_device() or step.logprobs,
                                  step.logprobs, rows_apart(layout.dp * selected.size, expert_cost)))


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
    rows: int | None = None,
    kv_len: int | None = None,
) -> list[Unit]:
    """The units one rank runs for one phase ('prefill': `seq` prompt tokens from `position`;
    'decode': one token at `position`), with example inputs of the right shapes, dtypes and values
    (layer 0's weights; every layer runs the same program; every row its own cache row; rows in a bucket
    of at least 2; the next tokens sampled from the top candidates unless not `samples`, their
    log-probabilities returned with `logprobs`, the logits with `return_logits`; `rows` rows per attention
    group, default the batch's; a prefill attending `kv_len` positions, default the bucket of its last)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    seq = 1 if phase == "decode" else seq
    dtype = weights.embed.dtype
    shape = cache_shape(config, layout, layout.rows_per_group(batch) * table_width(max_seq_len))
    caches = (np.zeros(shape, dtype), np.zeros(shape, dtype))
    rank = RankValues.of(config, layout)
    ids = (np.arange(batch * seq, dtype=np.int32).reshape(batch, seq) * 7919) % config.vocab_size
    step = uniform_step(batch, seq, position, layout, max_seq_len, ids, all_positions=False, rows=rows)
    total = step.input_ids.shape[0]
    if samples:
        step.sampled = Sampled(np.full(total, 0.7, np.float32), np.full(total, 8, np.int32),
                               np.full(total, 0.9, np.float32), np.linspace(0.05, 0.95, total, dtype=np.float32))
    step.return_logits, step.logprobs = return_logits, logprobs
    mine = group_rows(step, layout)
    h = np.take(weights.embed, step.input_ids[mine].reshape(-1) % weights.embed.shape[0], axis=0)
    layer = weights.layers[0]
    union, real = layout.union_tokens(step.bucket, step.token_valid, step.max_tokens)
    kv_len = step.kv_len or kv_len or kv_len_for(step.kv_length, max_seq_len)
    constants = layer_constants(config, layout, real, seq, kv_len, layer.w13.shape[0], expert_cost, h.shape[0])
    return [
        embedding_call(step.input_ids[mine].reshape(-1), weights, rank, layout),
        layer_call(phase, layer_inputs(h, step, layout, union, rank, rope, caches, layer, kv_len), constants),
        lm_head_call(h, step, weights, rank, config, layout, expert_cost),
    ]
