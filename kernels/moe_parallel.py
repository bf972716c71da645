"""MoE block over ranks: experts sliced over `moe_tp` ranks and spread over `moe_ep` rank groups.

Layout (W = moe_tp x moe_ep ranks): a slice group of moe_tp ranks holds the same L experts, each rank
one slice of their intermediate dimension; the moe_ep slice groups hold different experts. moe_tp = 1
is pure expert parallelism (whole experts, pairs exchanged with all_to_all); moe_ep = 1 slices every
expert over all ranks (no exchange of pairs at all).
"""

import ml_dtypes
import numpy as np

from kernels.collectives import ReplicaGroups, all_reduce, all_to_all, group_size
from kernels.moe_grouped import grouped_experts
from kernels.moe_router import moe_router
from kernels.slots import place_rows, rank_within


def worst_case_capacity(tokens: int, slots_per_token: int, local_experts: int) -> int:
    """Pairs one rank can send to one other rank at most: a token names each expert once, so it sends
    at most min(slots_per_token, local_experts) pairs to any rank."""
    return tokens * min(slots_per_token, local_experts)


def _exact_integers(dtype: np.dtype) -> int:
    """Largest n such that every integer 0..n is exactly representable in the float `dtype`."""
    return 2 ** (ml_dtypes.finfo(dtype).nmant + 1)


def dispatch_experts(
    x: np.ndarray, chosen: np.ndarray, valid: np.ndarray, w13: np.ndarray, w2: np.ndarray, *,
    capacity: int, block_rows: int, ep_groups: ReplicaGroups, scales: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair r through expert chosen[r], held by the rank of `ep_groups` at position chosen[r] // L.

    x: [P, hidden] pair rows, chosen: [P] int expert ids among all L * W experts of the group,
    valid: [P] bool; w13: [L, 2I', hidden], w2: [L, hidden, I'] this rank's (slices of its) experts.
    Returns (y [P, hidden], zero for pairs not run; kept [P] bool, False for valid pairs over capacity).

    Each valid pair goes through a send buffer [W, capacity, hidden + 1] (the extra column carries local
    expert id + 1, 0 marking an empty slot), one all_to_all; received rows run through the local
    experts (schedule `block_rows`; FP8 `scales` as in `grouped_experts`), a second all_to_all returns them.
    With capacity = worst_case_capacity nothing is dropped.
    """
    pairs, hidden = x.shape
    world = group_size(ep_groups)
    local = w13.shape[0]
    if local + 1 > _exact_integers(x.dtype):
        raise ValueError(f"{local} experts per rank: their ids are not exact in a {x.dtype} tag column")
    first = np.arange(world, dtype=np.int32)[None, :] * local  # first expert of each rank
    goes_to = (chosen[:, None] >= first) & (chosen[:, None] < first + local) & valid[:, None]  # [P, W]
    destination = goes_to.astype(np.int32)
    place = rank_within(destination)
    kept = valid & (place < capacity)
    rank = np.sum(destination * np.arange(world, dtype=np.int32)[None, :], axis=1)
    slot = rank * capacity + place
    tag = (chosen - rank * local + 1).astype(x.dtype)
    send = place_rows(np.concatenate([x, tag[:, None]], axis=1), slot, kept, world * capacity)

    received = all_to_all(send.reshape(world, capacity, hidden + 1), 0, 0,
                          ep_groups).reshape(world * capacity, hidden + 1)
    local_tag = np.rint(received[:, hidden].astype(np.float32)).astype(np.int32)
    y = grouped_experts(received[:, :hidden], np.maximum(local_tag - 1, 0), local_tag > 0, w13, w2,
                        block_rows=block_rows, scales=scales)
    returned = all_to_all(y.reshape(world, capacity, hidden), 0, 0, ep_groups).reshape(world * capacity, hidden)
    return np.where(kept[:, None], np.take(returned, np.where(kept, slot, 0), axis=0), np.zeros_like(x[:1])), kept


def moe_block_parallel(
    gathered: np.ndarray,
    union_rows: np.ndarray,
    union_member: np.ndarray,
    union_valid: np.ndarray,
    member_slots: np.ndarray,
    own_members: np.ndarray,
    own_position: np.ndarray,
    gate: np.ndarray,
    bias: np.ndarray,
    w13: np.ndarray,
    w2: np.ndarray,
    *,
    top_k: int,
    members: int,
    per_token: int,
    own_count: int,
    real_pairs: int,
    capacity: int,
    block_rows: int,
    slice_groups: ReplicaGroups,
    ep_groups: ReplicaGroups,
    combine_groups: ReplicaGroups,
    copies: int = 1,
    scales: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """gathered: [M / copies * T, hidden], the normalised tokens of the `members` (M) members of this rank's
    slice group, member by member (all_gather over slice_groups, or the caller's own exchange), each run of
    `copies` consecutive members (the attention tp ranks of one group, holding the same tokens) once -> (out
    [T, hidden] for this rank's T tokens, dropped [2] int32: pairs of this rank's tokens over capacity,
    then 0).

    Rank-specific data (arrays, so every rank traces the same program):
      union_rows [U] int32: the gathered rows that can be real (U is static: the bucket's), union_member
        [U] int32 the member each came from, union_valid [U] bool whether it is a real token this step;
      member_slots: [M * per_token] int32, member by member which of each token's top_k choices it handles
        (per_token = top_k / tp: the tp ranks of an attention group hold the same tokens and split them);
      own_members: the own_count members holding this rank's tokens; own_position: this rank's position
        in the slice group (first entry).
    Arrays that could have a single entry are padded to two (no compiled input has a dimension of 1);
    only their first entries are read.
    gate: [hidden, E], bias: [E] for every loaded expert; w13: [L, 2I/M, hidden], w2: [L, hidden, I/M]
    this rank's slices of the experts of its slice group (float8_e4m3fn codes with FP8 `scales`, as in
    `kernels.moe_grouped.grouped_experts`).

    1. Of the slice group's gathered tokens, the U that can be real are kept (padding never reaches an
       expert) and routed (where the copies make U the larger, the gathered tokens are routed, each once).
    2. Their pairs (each row x its member's slots, at most real_pairs of them real) run through this rank's
       slices (schedule `block_rows`), dispatched over `ep_groups` to the slice group holding the expert
       when moe_ep > 1.
    3. Weighted sums per row are all-reduced over the slice group (summing the slices), put back in
       place, this rank adds up its own members' rows, and `combine_groups` sums the choices split
       over attention tp ranks outside the slice group. The own_count members holding the same tokens
       are consecutive in the slice group: where that exchanges fewer rows, each rank first puts its rows
       in place and sums those copies, and the slice group all-reduces one [T, hidden] per attention
       group instead of every union row (tp x fewer rows at a full decode bucket).
    """
    hidden = gathered.shape[-1]
    tokens = gathered.shape[0] * copies // members
    source = union_rows  # union rows index the [M * T] layout: the copy they name is kept once
    if copies > 1:
        group = np.floor(union_member.astype(np.float32) / np.float32(copies)).astype(np.int32)
        source = group * np.int32(tokens) + (union_rows - union_member * np.int32(tokens))
    rows = np.take(gathered, source, axis=0)  # [U, hidden]
    if gathered.shape[0] < rows.shape[0]:  # each token routed once, not once a copy (a large prefill's union)
        weights, experts = (np.take(a, source, axis=0) for a in moe_router(gathered, gate, bias, top_k))
    else:
        weights, experts = moe_router(rows, gate, bias, top_k)
    member_slots = member_slots[: members * per_token].reshape(members, per_token)
    slots = np.take(member_slots, union_member, axis=0)  # [U, per_token]
    chosen = np.take_along_axis(experts, slots, axis=1).reshape(-1)
    pair_weights = np.take_along_axis(weights, slots, axis=1)
    valid = np.repeat(union_valid, per_token)
    pairs = np.repeat(rows, per_token, axis=0)
    if group_size(ep_groups) == 1:
        y, kept = grouped_experts(pairs, chosen, valid, w13, w2, block_rows=block_rows, real_rows=real_pairs,
                                  scales=scales), valid
    else:
        y, kept = dispatch_experts(pairs, chosen, valid, w13, w2, capacity=capacity, block_rows=block_rows,
                                   ep_groups=ep_groups, scales=scales)
    per_row = np.sum(y.reshape(-1, per_token, hidden) * pair_weights.astype(gathered.dtype)[..., None], axis=1)
    if members // own_count * tokens < per_row.shape[0]:  # fewer rows to exchange once the copies are summed
        every = place_rows(per_row, union_rows, union_valid, members * tokens)
        every = np.sum(every.reshape(members // own_count, own_count, tokens, hidden), axis=1)
        every = all_reduce(every, slice_groups)  # [M / copies, T, hidden], every slice summed
        mine = np.take(np.repeat(every, own_count, axis=0), own_members[:1], axis=0).reshape(tokens, hidden)
    else:
        per_row = all_reduce(per_row, slice_groups)  # [U, hidden], every slice summed
        every = place_rows(per_row, union_rows, union_valid, members * tokens).reshape(members, tokens, hidden)
        mine = np.sum(np.take(every, own_members[:own_count], axis=0), axis=0)
    mine_pairs = np.repeat(union_member == own_position[:1], per_token)
    dropped = np.sum((valid & np.logical_not(kept) & mine_pairs).astype(np.int32))
    return all_reduce(mine, combine_groups), np.stack([dropped, dropped * 0])
