"""The device program: which unit (`minimax_m2.device.units`) a step calls, with which inputs and constants.

`MiniMaxM2Model` runs exactly these calls on CPU, so every accuracy test tests what would be compiled;
`program_units` hands any tool the units of one phase with example inputs, so the whole program can be
traced; the serving engine's warm-up compiles one program per distinct `Unit.key`.

A step runs R rows of S tokens in each attention group, passed flat as T = R * S tokens. Every row has
its own positions and its own KV-cache blocks (a paged cache), so one step serves sequences at different
lengths: a decode step (S = 1) over every running request, or a prefill step over chunks of prompts (S =
the chunk). Tokens that only pad a row or the step never reach an expert and write only the cache's
scratch block. No compiled input or output has a dimension of 1 (the Neuron compiler squeezes them): rows
come in buckets of at least 2, tokens are flat, heads and head_dim share one cache axis, and rank values
that could have one entry are padded to two. No 64-bit value enters a unit. Programs: `embedding`,
`prefill_layer` or `decode_layer`, `lm_head`, `copy_block`. What a step carries, and the KV cache's blocks,
tables and tiles, are in `minimax_m2.device.step`.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.expert_schedule import ExpertCost, choose_block_rows, rows_apart, runs_numpy
from minimax_m2.device.step import (
    KV_BLOCK,
    Sampled,
    Step,
    cache_shape,
    group_rows,
    kv_len_for,
    kv_tile_for,
    mask_words,
    padded,
    picked,
    striped,
    table_width,
    uniform_step,
)
from minimax_m2.device.units import copy_unit, embedding_unit, layer_unit, lm_head_unit
from minimax_m2.generation import MAX_LOGPROBS
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.model_weights import LAYER_WEIGHT_NAMES, LayerWeights, ModelWeights

# a step of at least this many tokens per attention group sends its attention output to the MoE through the
# tp group first (`_attention_gathered`): below it the exchange's latency outweighs the bytes it saves
SCATTER_TOKENS = 16
CANDIDATES = 64  # the device samples among this many most likely tokens (top_k up to this)
TOP_LOGPROBS = MAX_LOGPROBS  # the most likely tokens whose log-probabilities the device returns, when asked


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
                    local_experts: int, expert_cost: ExpertCost, tokens: int, spread: bool = False) -> dict[str, Any]:
    """Keyword constants of `layer_unit`; union: the tokens a slice group gathers that can be real; expert_cost:
    the target's cost of one expert over n rows, which chooses the schedules; tokens: the unit's T; spread:
    the step's caches lie in several attention groups (each group then attends every group's tokens)."""
    top_k = config.num_experts_per_tok
    rows = expert_rows(config, layout, union, local_experts)
    queries = tokens * layout.dp if spread else tokens
    return dict(
        head_dim=config.head_dim, eps=config.rms_norm_eps, top_k=top_k, seq=seq, block=KV_BLOCK, kv_len=kv_len,
        kv_tile=kv_tile_for(queries, config.num_attention_heads // layout.tp, kv_len), ragged=seq == 1,
        real_pairs=union * top_k // layout.tp,
        members=layout.moe_tp, per_token=top_k // layout.tp, own_count=len(layout.own_members()),
        capacity=layout.capacity(union, top_k, local_experts), count_drops=layout.capacity_factor is not None,
        block_rows=choose_block_rows(rows, local_experts, expert_cost), rows_apart=rows_apart(tokens, expert_cost),
        scatter=tokens % layout.tp == 0 and tokens >= SCATTER_TOKENS, tp_groups=layout.tp_groups,
        slice_groups=layout.slice_groups, ep_groups=layout.ep_groups, combine_groups=layout.combine_groups,
        host_schedule=runs_numpy(expert_cost), spread_groups=layout.spread_groups if spread else None,
    )


def lm_head_constants(config: MiniMaxM2Config, layout: ParallelLayout, return_logits: bool,
                      samples: bool = True, logprobs: bool = False, apart: bool = False,
                      partial_sort: bool = False) -> dict[str, Any]:
    """samples: some row of the step is sampled on the device (else the sampling is traced out); logprobs:
    the step returns its tokens' log-probabilities (and the TOP_LOGPROBS largest); apart: the vocabulary
    projection multiplies its rows one at a time; partial_sort: the most likely tokens found by a partial
    sort (NumPy runs the unit itself: this CPU)."""
    return dict(eps=config.rms_norm_eps, vocab_size=config.vocab_size, dp=layout.dp, tp=layout.tp,
                candidates=min(CANDIDATES, config.vocab_size) if samples else 0,
                logprobs=min(TOP_LOGPROBS, config.vocab_size) if logprobs else 0, return_logits=return_logits,
                rows_apart=apart, world_groups=layout.world_groups, partial_sort=partial_sort)


def layer_inputs(h: Any, step: Step, layout: ParallelLayout, union: tuple[np.ndarray, np.ndarray, np.ndarray],
                 rank: RankValues, rope: tuple[np.ndarray, np.ndarray], caches: tuple[np.ndarray, np.ndarray],
                 weights: LayerWeights, kv_len: int) -> dict[str, Any]:
    """The array arguments of `layer_unit`, by name (union: `ParallelLayout.union_tokens`; kv_len: the
    positions the step attends, which set its block tables' width)."""
    mine = group_rows(step, layout)
    spread = {}
    if step.spread is not None:
        spread = dict(spread_positions=step.positions.reshape(-1), spread_written=step.spread.written[layout.group])
        if step.spread.tables is not None:
            spread["spread_starts"] = step.spread.starts[layout.group]
    if step.kv_tiles is not None:
        kv_blocks = step.kv_tiles[layout.group]
    elif step.spread is not None:
        kv_blocks = step.spread.tables[layout.group]
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
    inputs.update(spread)
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
                 layout: ParallelLayout, expert_cost: ExpertCost, picks: np.ndarray | None = None) -> Unit:
    """The lm_head unit of a step: each of this group's rows' selected tokens (as flat indices into its T
    tokens), and every group's sampling arrays (expert_cost: the target's costs, which choose the
    projection's schedule; on this CPU the lm_head's own measured product, `MiniMaxM2Model.head_cost`).
    picks: only these of each group's selected tokens, unpadded (where nothing is compiled, `head_picks`);
    None: all of them, padded to at least 2 as a compiled input is."""
    mine = group_rows(step, layout)
    seq, chosen = step.input_ids.shape[1], step.selected.shape[1]
    least = 2 if picks is None else 1
    selected = (np.arange(mine.stop - mine.start, dtype=np.int32)[:, None] * seq + step.selected[mine]).reshape(-1)
    if picks is not None:
        selected = selected[np.maximum(picks[layout.group], 0)]
    sampled = (step.sampled or Sampled.greedy(step.input_ids.shape[0])).repeat(chosen).padded(layout.dp, picks,
                                                                                              least)
    selected = padded(selected, least)
    inputs = dict(h=h, selected=selected, final_norm=weights.final_norm, lm_head=weights.lm_head,
                  vocab_offset=rank.vocab_offset, temperature=sampled.temperature, top_k=sampled.top_k,
                  top_p=sampled.top_p, uniform=sampled.uniform)
    masks = step.resolved_masks()
    if masks is not None:
        index = picked(np.repeat(step.mask_index.reshape(layout.dp, -1), chosen, axis=1), picks, least, -1)
        columns = weights.lm_head.shape[-1]
        inputs.update(masks=rank_masks(masks, layout.rank * columns, columns),
                      mask_index=index.astype(np.int32))
    return Unit("lm_head", lm_head_unit, inputs,
                lm_head_constants(config, layout, step.return_logits,
                                  # one variant: greedy rows stay so; a prefill, or a step with grammar masks, always
                                  # may sample (it costs little beside the chunk, or the masks, and halves their
                                  # lm_head programs)
                                  seq > 1 or sampled.samples_on_device() or step.logprobs or masks is not None,
                                  step.logprobs, rows_apart(layout.dp * selected.size, expert_cost),
                                  runs_numpy(expert_cost)))


def rank_masks(masks: np.ndarray, start: int, columns: int) -> np.ndarray:
    """Masks over the whole vocabulary [M, ceil(V / 32)] int32 -> the bits of one rank's columns start ..
    start + columns - 1, repacked [M, ceil(columns / 32)] int32 (columns past the vocabulary forbidden)."""
    bits = np.unpackbits(np.ascontiguousarray(masks, np.int32).view(np.uint8), axis=1, bitorder="little")
    part = bits[:, start:start + columns]
    part = np.pad(part, ((0, 0), (0, mask_words(columns) * 32 - part.shape[1])))
    return np.packbits(part, axis=1, bitorder="little").view(np.int32)


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
    masks: int = 0,
    every_position: bool = False,
    rows: int | None = None,
    kv_len: int | None = None,
    spread: bool = False,
) -> list[Unit]:
    """The units one rank runs for one phase ('prefill': `seq` prompt tokens from `position`;
    'decode': one token at `position`), with example inputs of the right shapes, dtypes and values
    (layer 0's weights; every layer runs the same program; every row its own cache row; rows in a bucket
    of at least 2; the next tokens sampled from the top candidates unless not `samples`, their
    log-probabilities returned with `logprobs`, the logits with `return_logits`; with `masks`, that many
    grammar masks, every other row constrained; with `every_position`, the next token of every position (a
    verify step's lm_head); `rows` rows per attention group, default the batch's; a
    prefill attending `kv_len` positions, default the bucket of its last; with `spread`, every row's sequence
    striped over the attention groups, `striped`)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    seq = 1 if phase == "decode" else seq
    dtype = weights.embed.dtype
    shape = cache_shape(config, layout, layout.rows_per_group(batch) * table_width(max_seq_len))
    caches = (np.zeros(shape, dtype), np.zeros(shape, dtype))
    rank = RankValues.of(config, layout)
    ids = (np.arange(batch * seq, dtype=np.int32).reshape(batch, seq) * 7919) % config.vocab_size
    step = uniform_step(batch, seq, position, layout, max_seq_len, ids, all_positions=every_position, rows=rows)
    if spread:
        width = table_width(max_seq_len)
        step = striped(step, layout.dp, width, layout.rows_per_group(batch) * width)
    total = step.input_ids.shape[0]
    if samples:
        step.sampled = Sampled(np.full(total, 0.7, np.float32), np.full(total, 8, np.int32),
                               np.full(total, 0.9, np.float32), np.linspace(0.05, 0.95, total, dtype=np.float32))
    step.return_logits, step.logprobs = return_logits, logprobs
    if masks:
        bits = np.random.default_rng(0).random((masks, mask_words(config.vocab_size) * 32)) < 0.5
        step.masks = np.packbits(bits, axis=1, bitorder="little").view(np.int32)
        step.mask_index = np.where(np.arange(total) % 2 == 0, np.arange(total) // 2 % masks, -1).astype(np.int32)
    mine = group_rows(step, layout)
    h = np.take(weights.embed, step.input_ids[mine].reshape(-1) % weights.embed.shape[0], axis=0)
    layer = weights.layers[0]
    union, real = layout.union_tokens(step.bucket, step.token_valid, step.max_tokens)
    kv_len = step.kv_len or kv_len or kv_len_for(step.kv_length, max_seq_len)
    constants = layer_constants(config, layout, real, seq, kv_len, layer.w13.shape[0], expert_cost, h.shape[0],
                                spread)
    return [
        embedding_call(step.input_ids[mine].reshape(-1), weights, rank, layout),
        layer_call(phase, layer_inputs(h, step, layout, union, rank, rope, caches, layer, kv_len), constants),
        lm_head_call(h, step, weights, rank, config, layout, expert_cost),
    ]
