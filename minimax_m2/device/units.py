"""The units nkipy compiles for a NeuronCore: functions of arrays only, returning arrays.

Each unit takes weights, KV caches, token ids, positions, cache blocks, RoPE tables and every rank-specific
value (expert slots, the MoE union's rows, slice-group positions, vocabulary offsets) as array arguments,
with config numbers, shapes, the expert schedule and replica groups as keyword constants, and writes its
KV caches in place into its input arrays (nkipy turns such a write into an aliased output, so the caches
stay on the device). `minimax_m2.device.program` says which unit a step calls with which inputs.

Units: `embedding_unit`; `layer_unit` (one function, traced per phase and shape: the same program serves
all layers, whose weights are its arguments); `lm_head_unit` (final norm of the selected tokens,
vocabulary split over all ranks, the next token of each chosen on the device: greedy, or sampled from the
top candidates; the logits gathered only when asked for); `copy_unit` (a cache block copied, for copy on
write of a shared prefix's last block).
"""

import numpy as np

from kernels import attention, moe_block, moe_block_parallel, rmsnorm, token_embedding
from kernels.collectives import ReplicaGroups, all_gather, all_reduce, all_to_all, group_size
from kernels.lm_head import gather_vocab, greedy_vocab_parallel, vocab_slice_logits
from kernels.logprobs import logprobs_vocab_parallel
from kernels.sampling import sample_vocab_parallel
from kernels.token_mask import mask_logits


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
    spread_positions: np.ndarray | None = None,
    spread_written: np.ndarray | None = None,
    spread_starts: np.ndarray | None = None,
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
    host_schedule: bool = False,
    spread_groups: ReplicaGroups | None = None,
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
    (`kv_tile_for`); ragged: one token per row, attending the tiles in kv_blocks; host_schedule: this CPU's
    attention, shaped by the step's values (`kernels.attention.attention`); scatter: how the attention
    output reaches the MoE when a slice group spans whole attention groups (`_attention_gathered`).
    Weights as in `LayerWeights`: with FP8 experts (w13_scale and w2_scale given), w13 and w2 hold
    float8_e4m3fn codes, each expert dequantised where it is read (`kernels.moe_grouped`).
    With spread_groups (context parallelism: a step's sequences held by several attention groups), kv_blocks
    are this group's blocks of every group's rows, and spread_positions [dp * T], spread_written [dp * T] and,
    for a prefill, spread_starts [dp * R, W] int32 say where every group's tokens are and where this group's
    cache takes them (`kernels.attention.attention`'s spread).
    Returns h; with count_drops (a capacity below the worst case), (h, dropped [2] int32).
    """
    scales = None if w13_scale is None else (w13_scale, w2_scale)
    normed = rmsnorm(h, input_norm, eps)
    spread = None if spread_groups is None else \
        (spread_positions, spread_written) + (() if spread_starts is None else (spread_starts,))
    attend = dict(head_dim=head_dim, eps=eps, block=block, kv_len=kv_len, seq=seq, replica_groups=tp_groups,
                  rows_apart=rows_apart, kv_tile=kv_tile, ragged=ragged, host_schedule=host_schedule, spread=spread,
                  spread_groups=spread_groups)
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
    temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, uniform: np.ndarray,
    masks: np.ndarray | None = None, mask_index: np.ndarray | None = None, *, eps: float, vocab_size: int,
    dp: int, tp: int, candidates: int, logprobs: int, return_logits: bool,
    rows_apart: bool, world_groups: ReplicaGroups, partial_sort: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """h: [T, hidden] of this rank's attention group, selected: [n] int32 (the tokens whose next token is
    wanted, e.g. each row's last real token) -> the next token of each selected token of every group,
    ids [N = dp * n] int32, identical on every rank; with logprobs > 0 then also each next token's
    log-probability [N] float32 and the `logprobs` largest [N, logprobs] with their ids [N, logprobs] int32
    (`kernels.logprobs`); with return_logits last the logits [N, vocab] float32. rows_apart: the vocabulary
    projection's schedule (`kernels.matmul.matmul`); partial_sort: how the most likely tokens are found
    (`kernels.sampling.top_candidates`: True only where NumPy runs the unit itself).

    The groups' selected tokens are gathered over all ranks (the tp copies of a group are identical; the
    first is kept), each rank projects them onto its vocabulary slice lm_head: [hidden, V / W] starting at
    vocab_offset[0], and the next token is chosen from the slices (`kernels.sampling`): greedy where
    temperature [N] is 0, else drawn with top_k [N] (0: none, sampled on the host), top_p [N] and
    uniform [N] in [0, 1). candidates = 0 (a step with no row to sample) leaves the sampling out: every
    row greedy, the sampling inputs unused. With masks [M, words] int32 (a grammar's allowed tokens of this
    rank's slice, bit-packed, `kernels.token_mask`) and mask_index [N] int32 (each row's mask, -1: none), the
    forbidden tokens' logits are at -1e30 before anything is chosen, scored or returned.
    """
    picked = all_rows(np.take(h, selected, axis=0), dp, tp, world_groups)  # [N, hidden]
    logits = vocab_slice_logits(picked, final_norm, lm_head, vocab_offset, eps=eps, vocab_size=vocab_size,
                                rows_apart=rows_apart)
    if masks is not None:
        logits = mask_logits(logits, masks, mask_index)
    ids = greedy_vocab_parallel(logits, vocab_offset, world_groups)
    if candidates:
        ids = sample_vocab_parallel(logits, vocab_offset, ids, temperature, top_k, top_p, uniform,
                                    candidates=candidates, replica_groups=world_groups, partial_sort=partial_sort)
    outputs = (ids,)
    if logprobs:
        outputs += logprobs_vocab_parallel(logits, vocab_offset, ids, top=logprobs, replica_groups=world_groups,
                                           partial_sort=partial_sort)
    if return_logits:
        outputs += (gather_vocab(logits, vocab_size, world_groups),)
    return outputs if len(outputs) > 1 else ids


def all_rows(h: np.ndarray, dp: int, tp: int, world_groups: ReplicaGroups) -> np.ndarray:
    """Every attention group's rows [rows, ...] gathered in group order -> [dp * rows, ...]."""
    rows = h.shape[0]
    every = all_gather(h, 0, world_groups).reshape(dp, tp, rows, *h.shape[1:])
    return every[:, 0].reshape(dp * rows, *h.shape[1:])
