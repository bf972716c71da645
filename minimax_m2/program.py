"""The device program: the units nkipy compiles for a NeuronCore, declared in one place.

Each unit is a function of arrays only (weights, KV caches, positions, RoPE tables and every
rank-specific value: expert slots, padding rows, slice-group positions, vocabulary offset), with config numbers, shapes and
replica groups as keyword constants. It returns arrays only, and writes its KV caches in place into
its input arrays (nkipy turns such a write into an aliased output, so the caches stay on the device).
`MiniMaxM2Model` runs exactly these units on CPU, so every accuracy test tests what would be compiled;
`program_units` hands any tool the units of one phase with example inputs, so the whole program can
be traced.

Units, per phase: `embedding`; `prefill_layer` or `decode_layer` (one function, traced once per
phase: the same program serves all layers, whose weights are its arguments); `lm_head` (final norm,
vocabulary split over all ranks, logits gathered, greedy tokens picked from each rank's best).
"""

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kernels import attention, lm_head_vocab_parallel, moe_block, moe_block_parallel, rmsnorm, token_embedding
from kernels.collectives import ReplicaGroups, all_gather, group_size
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights import LAYER_WEIGHT_NAMES, LayerWeights, ModelWeights

KV_BLOCK = 128


def embedding_unit(input_ids: np.ndarray, embed: np.ndarray) -> np.ndarray:
    """input_ids: [B, S] int32, embed: [vocab, hidden] -> h [B, S, hidden]."""
    return token_embedding(input_ids, embed)


def layer_unit(
    h: np.ndarray,
    positions: np.ndarray,
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
    kv_len: int,
    capacity: int,
    tp_groups: ReplicaGroups,
    slice_groups: ReplicaGroups,
    ep_groups: ReplicaGroups,
    combine_groups: ReplicaGroups,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One decoder layer: h + attn(norm(h)), then + moe(norm(.)).

    h: [B, S, hidden] at positions [S] int32; k/v_cache: [B, Hkv, max_seq, D], written at `positions`.
    union_rows, union_member [U] int32, union_valid [U] bool (the gathered tokens of this rank's MoE
    slice group that are not batch padding: padding never reaches an expert), member_slots
    [M, top_k / tp] int32, own_members [A] int32, own_position [1] int32: see
    `kernels.moe_parallel.moe_block_parallel`.
    Weights as in `LayerWeights`. Returns h on one rank; over several, (h, dropped [] int32).
    """
    batch, seq, hidden = h.shape
    h = h + attention(
        rmsnorm(h, input_norm, eps), positions, wq, wk, wv, wo, q_norm, k_norm, cos_table, sin_table, k_cache, v_cache,
        head_dim=head_dim, eps=eps, kv_len=kv_len, replica_groups=tp_groups,
    )
    x = rmsnorm(h, post_norm, eps).reshape(batch * seq, hidden)
    if group_size(slice_groups) * group_size(ep_groups) == 1:  # one rank
        return h + moe_block(x, gate, bias, w13, w2, top_k=top_k).reshape(batch, seq, hidden)
    moe, dropped = moe_block_parallel(
        x, union_rows, union_member, union_valid, member_slots, own_members, own_position, gate, bias, w13, w2,
        top_k=top_k, capacity=capacity, slice_groups=slice_groups, ep_groups=ep_groups, combine_groups=combine_groups,
    )
    return h + moe.reshape(batch, seq, hidden), dropped


def lm_head_unit(
    h: np.ndarray, final_norm: np.ndarray, lm_head: np.ndarray, vocab_offset: np.ndarray, *,
    eps: float, vocab_size: int, dp: int, tp: int, world_groups: ReplicaGroups,
) -> tuple[np.ndarray, np.ndarray]:
    """h: [rows, S, hidden] of this rank's attention group -> (logits [dp * rows, S, vocab] float32,
    greedy tokens [dp * rows, S] int32) for the whole batch, identical on every rank.

    The groups' rows are gathered over all ranks (the tp copies of a group are identical; the first is
    kept), then each rank projects onto its vocabulary slice lm_head: [hidden, V / W] starting at
    vocab_offset: [1] int32.
    """
    return lm_head_vocab_parallel(all_rows(h, dp, tp, world_groups), final_norm, lm_head, vocab_offset, eps=eps,
                                  vocab_size=vocab_size, replica_groups=world_groups)


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
    inputs: dict[str, np.ndarray]
    constants: dict[str, Any] = field(default_factory=dict)


def run_on_cpu(unit: Unit) -> Any:
    """A unit run as plain NumPy in this process (the model's default runner)."""
    return unit.fn(**unit.inputs, **unit.constants)


def kv_len_for(position: int, seq: int, max_seq_len: int) -> int:
    """Cache slots attended after writing `seq` tokens at `position`: whole blocks of KV_BLOCK (one
    compiled decode program per block count)."""
    return min(max_seq_len, -(-(position + seq) // KV_BLOCK) * KV_BLOCK)


def layer_constants(config: MiniMaxM2Config, layout: ParallelLayout, union: int, kv_len: int,
                    local_experts: int) -> dict[str, Any]:
    """Keyword constants of `layer_unit`; union: the real tokens a slice group gathers (U)."""
    top_k = config.num_experts_per_tok
    return dict(
        head_dim=config.head_dim, eps=config.rms_norm_eps, top_k=top_k, kv_len=kv_len,
        capacity=layout.capacity(union, top_k, local_experts), tp_groups=layout.tp_groups,
        slice_groups=layout.slice_groups, ep_groups=layout.ep_groups, combine_groups=layout.combine_groups,
    )


def lm_head_constants(config: MiniMaxM2Config, layout: ParallelLayout) -> dict[str, Any]:
    return dict(eps=config.rms_norm_eps, vocab_size=config.vocab_size, dp=layout.dp, tp=layout.tp,
                world_groups=layout.world_groups)


@dataclass
class RankValues:
    """Rank-specific arrays, passed to the units as data so every rank compiles the same program."""

    member_slots: np.ndarray  # [M, top_k / tp] int32, for each member of the slice group
    own_members: np.ndarray  # [A] int32, slice-group positions of the members holding this rank's tokens
    own_position: np.ndarray  # [1] int32, this rank's position in its slice group
    vocab_offset: np.ndarray  # [1] int32

    @classmethod
    def of(cls, config: MiniMaxM2Config, layout: ParallelLayout) -> "RankValues":
        top_k = config.num_experts_per_tok
        return cls(
            member_slots=np.stack([layout.expert_slots(top_k, r) for r in layout.slice_members()]),
            own_members=layout.own_members(),
            own_position=np.array([layout.slice_rank], np.int32),
            vocab_offset=np.array([layout.rank * layout.vocab_columns(config.vocab_size)], np.int32),
        )


def layer_inputs(h: np.ndarray, positions: np.ndarray, union: tuple[np.ndarray, np.ndarray, np.ndarray],
                 rank: RankValues, rope: tuple[np.ndarray, np.ndarray], caches: tuple[np.ndarray, np.ndarray],
                 weights: LayerWeights) -> dict[str, np.ndarray]:
    """The array arguments of `layer_unit`, by name (union: `ParallelLayout.union_tokens`)."""
    inputs = dict(h=h, positions=positions, union_rows=union[0], union_member=union[1], union_valid=union[2],
                  member_slots=rank.member_slots,
                  own_members=rank.own_members, own_position=rank.own_position,
                  cos_table=rope[0], sin_table=rope[1], k_cache=caches[0], v_cache=caches[1])
    inputs.update({name: getattr(weights, name) for name in LAYER_WEIGHT_NAMES})
    return inputs


def embedding_call(input_ids: np.ndarray, weights: ModelWeights) -> Unit:
    return Unit("embedding", embedding_unit, dict(input_ids=input_ids, embed=weights.embed))


def layer_call(phase: str, inputs: dict[str, np.ndarray], constants: dict[str, Any]) -> Unit:
    """The layer unit of 'prefill' or 'decode' with `layer_inputs` and `layer_constants`."""
    return Unit(f"{phase}_layer", layer_unit, inputs, constants)


def lm_head_call(h: np.ndarray, weights: ModelWeights, rank: RankValues, config: MiniMaxM2Config,
                 layout: ParallelLayout) -> Unit:
    return Unit("lm_head", lm_head_unit,
                dict(h=h, final_norm=weights.final_norm, lm_head=weights.lm_head, vocab_offset=rank.vocab_offset),
                lm_head_constants(config, layout))


def program_units(
    config: MiniMaxM2Config,
    layout: ParallelLayout,
    weights: ModelWeights,
    rope: tuple[np.ndarray, np.ndarray],
    *,
    phase: str,
    batch: int,
    seq: int,
    max_seq_len: int,
    position: int = 0,
) -> list[Unit]:
    """The units one rank runs for one phase ('prefill': `seq` prompt tokens from `position`;
    'decode': one token at `position`), with example inputs of the right shapes, dtypes and values
    (layer 0's weights; every layer runs the same program)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    seq = 1 if phase == "decode" else seq
    rows = layout.rows_per_group(batch)
    dtype = weights.embed.dtype
    kv_heads = config.num_key_value_heads // layout.tp
    cache_shape = (rows, kv_heads, max_seq_len, config.head_dim)
    caches = (np.zeros(cache_shape, dtype), np.zeros(cache_shape, dtype))
    rank = RankValues.of(config, layout)
    ids = (np.arange(rows * seq, dtype=np.int32).reshape(rows, seq) * 7919) % config.vocab_size
    h = weights.embed[ids]
    positions = np.arange(position, position + seq, dtype=np.int32)
    layer = weights.layers[0]
    kv_len = kv_len_for(position, seq, max_seq_len)
    union = layout.union_tokens(batch, seq)
    return [
        embedding_call(ids, weights),
        layer_call(phase, layer_inputs(h, positions, union, rank, rope, caches, layer),
                   layer_constants(config, layout, len(union[0]), kv_len, layer.w13.shape[0])),
        lm_head_call(h[:, -1:], weights, rank, config, layout),
    ]
