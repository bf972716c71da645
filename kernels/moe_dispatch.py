"""Expert-parallel MoE block: experts spread over ranks, pairs exchanged with all_to_all."""

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


def moe_block_ep(
    x: np.ndarray,
    token_valid: np.ndarray,
    gate: np.ndarray,
    bias: np.ndarray,
    w13: np.ndarray,
    w2: np.ndarray,
    slots: np.ndarray,
    *,
    top_k: int,
    capacity: int,
    ep_groups: ReplicaGroups,
    tp_groups: ReplicaGroups | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """x: [T, hidden] -> (out [T, hidden], dropped: [] int32, this rank's pairs over capacity).

    token_valid: [T] bool, False for rows that only pad the batch: they are never dispatched.
    gate: [hidden, E], bias: [E] for all E experts loaded across the W ranks of `ep_groups`; this rank
    holds experts r*L .. r*L+L-1 (L = E / W) as w13: [L, hidden, 2I], w2: [L, I, hidden].
    slots: [top_k / tp] int, which of each token's top_k choices this rank dispatches: the tp ranks of
    an attention group hold the same tokens and split their choices, then all-reduce the partial sums
    over `tp_groups`. Being data, slots keep the traced program identical on every rank.

    Each chosen (token, expert) pair goes to the expert's rank through a send buffer
    [W, capacity, hidden + 1] (the extra column carries local expert id + 1, 0 marking an empty slot),
    one all_to_all; received rows run through the local experts, a second all_to_all returns them,
    and the router weights combine them. With capacity = worst_case_capacity nothing is dropped.
    """
    tokens, hidden = x.shape
    world = group_size(ep_groups)
    local = w13.shape[0]
    per_token = slots.shape[0]
    if local + 1 > _exact_integers(x.dtype):
        raise ValueError(f"{local} experts per rank: their ids are not exact in a {x.dtype} tag column")
    weights, experts = moe_router(x, gate, bias, top_k)
    chosen = np.take(experts, slots, axis=1).reshape(-1)  # [P], P = tokens * per_token
    pair_weights = np.take(weights, slots, axis=1).astype(x.dtype)
    pair_valid = np.repeat(token_valid, per_token)

    first = np.arange(world, dtype=np.int32)[None, :] * local  # first expert of each rank
    goes_to = (chosen[:, None] >= first) & (chosen[:, None] < first + local) & pair_valid[:, None]  # [P, W]
    destination = goes_to.astype(np.int32)
    place = rank_within(destination)
    kept = pair_valid & (place < capacity)
    rank = np.sum(destination * np.arange(world, dtype=np.int32)[None, :], axis=1)
    slot = rank * capacity + place
    tag = (chosen - rank * local + 1).astype(x.dtype)
    tagged = np.concatenate([np.repeat(x, per_token, axis=0), tag[:, None]], axis=1)
    send = place_rows(tagged, slot, kept, world * capacity)

    received = all_to_all(send.reshape(world, capacity, hidden + 1), 0, 0, ep_groups).reshape(world * capacity, hidden + 1)
    local_tag = np.rint(received[:, hidden].astype(np.float32)).astype(np.int32)
    y = grouped_experts(received[:, :hidden], np.maximum(local_tag - 1, 0), local_tag > 0, w13, w2)
    returned = all_to_all(y.reshape(world, capacity, hidden), 0, 0, ep_groups).reshape(world * capacity, hidden)

    pair_out = np.where(kept[:, None], np.take(returned, np.where(kept, slot, 0), axis=0), np.zeros_like(x[:1]))
    partial = np.sum(pair_out.reshape(tokens, per_token, hidden) * pair_weights[:, :, None], axis=1)
    dropped = np.sum((pair_valid & np.logical_not(kept)).astype(np.int32))
    return all_reduce(partial, tp_groups), dropped
