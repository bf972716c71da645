"""What a run will hold, per rank, worked out from the config before anything is allocated; refused
up front when it cannot fit.

Weights (this rank's share, from their shapes), the KV cache's pool of blocks (every layer), RoPE tables,
and an estimate of the largest step's activations (one tile of attention scores, the MoE's pair buffers,
logits) plus the logits a run keeps (`--dump-logits`). The pool is sized from what is left (`pool_blocks`).
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.program import SCATTER_TOKENS
from minimax_m2.device.step import KV_BLOCK, blocks_for, kv_tile_for, spread_chunk
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.model_weights import rank_shapes

GIB = 1 << 30
# trn2: 96 GiB of HBM per Trainium2 chip, 4 logical NeuronCores per chip at LNC=2 (AWS Neuron docs, Trn2
# architecture); the runtime and compiled programs take some of it.
NEURON_CORE_HBM = 24 * GIB


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one rank holds."""

    weights: int
    kv_cache: int
    activations: int  # estimate of the largest step's working set
    kept_logits: int  # logits kept for the whole run (--dump-logits)
    kv_blocks: int = 0  # the KV pool's blocks of KV_BLOCK positions per attention group

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.kept_logits

    def describe(self) -> str:
        parts = [f"weights {_gib(self.weights)}",
                 f"KV cache {_gib(self.kv_cache)} ({self.kv_blocks:,} blocks, {self.kv_blocks * KV_BLOCK:,} tokens)",
                 f"activations ~{_gib(self.activations)}"]
        if self.kept_logits:
            parts.append(f"kept logits {_gib(self.kept_logits)}")
        return ", ".join(parts) + f" = {_gib(self.total)}"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 100 else f"{n / (1 << 20):.1f} MiB"


def kv_block_bytes(config: MiniMaxM2Config, layout: ParallelLayout, dtype: np.dtype) -> int:
    """Bytes of one KV block (KV_BLOCK positions, keys and values of every layer) on one rank."""
    kv_heads = config.num_key_value_heads // layout.tp
    return 2 * config.num_hidden_layers * KV_BLOCK * kv_heads * config.head_dim * np.dtype(dtype).itemsize


def plan_memory(config: MiniMaxM2Config, layout: ParallelLayout, num_experts: int, dtype: np.dtype, *,
                kv_blocks: int, max_seq_len: int, step_rows: int, step_tokens: int, kept_logits: int = 0,
                real_tokens: int | None = None, logits_rows: int | None = None, fp8: bool = False,
                spread: bool = False) -> MemoryPlan:
    """One rank's bytes: a pool of `kv_blocks` cache blocks (and the scratch block) in its attention group, a
    context of `max_seq_len` positions; the largest step runs `step_rows` rows of `step_tokens` tokens each
    in its group, at most `real_tokens` of them real in all groups (default: all), with the logits of
    `logits_rows` tokens of all groups (default: one a row); `kept_logits`: logits rows (token positions)
    kept for the whole run, all ranks' rows included; `fp8`: the experts held as 8-bit codes with their
    scales (each decoded where it is read); `spread`: the step's caches spread over the groups, every group
    attending every group's tokens (their q, k, v gathered, their attention's parts exchanged)."""
    itemsize = np.dtype(dtype).itemsize
    model, layer = rank_shapes(config, num_experts, layout, np.dtype(dtype), fp8)

    def nbytes(specs: dict) -> int:
        return sum(int(np.prod(shape, dtype=np.float64)) * np.dtype(kind).itemsize for shape, kind in specs.values())

    weights = nbytes(model) + config.num_hidden_layers * nbytes(layer)
    kv = (kv_blocks + 1) * kv_block_bytes(config, layout, dtype)
    rope = 2 * max_seq_len * config.rotary_dim * itemsize
    tokens = step_rows * step_tokens
    q_heads = config.num_attention_heads // layout.tp
    queries = tokens * layout.dp if spread else tokens
    scores = 3 * queries * q_heads * kv_tile_for(queries, q_heads, max_seq_len) * 4  # scores, weights, a cast copy
    if spread:  # every group's q, k, v; the parts (out, best, total) sent and received, float32
        kv_heads = config.num_key_value_heads // layout.tp
        scores += queries * config.head_dim * ((q_heads + 2 * kv_heads) * itemsize + 2 * q_heads * 4) + \
            2 * queries * q_heads * 2 * 4
    gathered = tokens * layout.moe_tp  # the slice group's tokens, gathered
    union = min(gathered, (real_tokens or tokens * layout.dp) * min(layout.tp, layout.moe_tp))
    pairs = union * max(1, config.num_experts_per_tok // layout.tp)
    local = num_experts // layout.moe_ep
    copies = layout.tp if 1 < layout.tp <= layout.moe_tp else 1  # gathered rows an attention group keeps once
    if copies > 1 and tokens % layout.tp == 0 and tokens >= SCATTER_TOKENS:
        # the all_to_all's output, its float32 sum of T / tp rows, then the all_gather's output (one row per
        # group's token), normalised through float32
        moe_input = tokens * config.hidden_size * itemsize + tokens // layout.tp * config.hidden_size * 8 + \
            gathered // copies * config.hidden_size * (4 + 2 * itemsize)
    elif copies > 1:  # the all_gather's output, then per group: a float32 sum, a float32 slice, groups and normed
        moe_input = gathered * config.hidden_size * itemsize + \
            gathered // copies * config.hidden_size * (8 + 2 * itemsize)
    else:
        moe_input = 2 * gathered * config.hidden_size * itemsize
    moe = pairs * (4 * config.hidden_size * itemsize + 8 * local) + moe_input
    logits = 2 * (logits_rows or step_rows * layout.dp) * config.vocab_size * 4  # a rank's slice, then all gathered
    activations = 8 * tokens * config.hidden_size * itemsize + scores + moe + logits
    if fp8:  # an expert at a time decoded through float32 (int32 bits, float32 values) into the model dtype
        decoded = int(np.prod(layer["w13"][0][1:])) + int(np.prod(layer["w2"][0][1:]))
        activations += decoded * (8 + itemsize)
    return MemoryPlan(int(weights), int(kv + rope), int(activations), int(kept_logits * config.vocab_size * 4),
                      kv_blocks)


def engine_plan(config: MiniMaxM2Config, layout: ParallelLayout, num_experts: int, dtype: np.dtype, *, slots: int,
                prefill_chunk: int, max_seq_len: int, kv_blocks: int, kept_logits: int = 0,
                fp8: bool = False, spread_from: int = 0) -> MemoryPlan:
    """One rank's bytes under the engine: a pool of `kv_blocks` blocks per attention group, and the largest
    step (a prefill of up to 2 x prefill_chunk tokens in a group, prefill_chunk of them real in all, or a
    decode of `slots` rows; with contexts from `spread_from` spread over several groups, also a spread
    prefill of `spread_chunk` tokens in every group, all real), with the logits of every row, or of every
    prompt position when they are kept; `fp8`: FP8 weights kept as codes (`plan_memory`)."""
    step_tokens = max(2 * prefill_chunk, slots)
    sizes = dict(kv_blocks=kv_blocks, max_seq_len=max_seq_len, step_rows=1, kept_logits=kept_logits,
                 logits_rows=layout.dp * (step_tokens if kept_logits else slots), fp8=fp8)
    plan = plan_memory(config, layout, num_experts, dtype, step_tokens=step_tokens,
                       real_tokens=max(prefill_chunk, slots * layout.dp), **sizes)
    if layout.dp == 1 or not 0 < spread_from <= max_seq_len:
        return plan
    chunk = spread_chunk(prefill_chunk, layout.dp)
    spread = plan_memory(config, layout, num_experts, dtype, step_tokens=chunk, real_tokens=layout.dp * chunk,
                         spread=True, **sizes)
    return max(plan, spread, key=lambda p: p.activations)


def pool_blocks(config: MiniMaxM2Config, layout: ParallelLayout, num_experts: int, dtype: np.dtype, *, slots: int,
                prefill_chunk: int, max_seq_len: int, available: int, device: str, kept_logits: int = 0,
                fp8: bool = False, spread_from: int = 0) -> int:
    """The KV pool's blocks per attention group when not given: on a NeuronCore every block the memory left
    after the weights, the largest step and 2% of spare holds; on a CPU, where an untouched block costs
    nothing, enough for `slots` whole contexts when that fits, else what is left."""
    rest = engine_plan(config, layout, num_experts, dtype, slots=slots, prefill_chunk=prefill_chunk,
                       max_seq_len=max_seq_len, kv_blocks=0, kept_logits=kept_logits, fp8=fp8,
                       spread_from=spread_from)
    fits = int((available * 0.98 - rest.total) // kv_block_bytes(config, layout, dtype))
    return max(fits, 0) if device == "neuron" else max(0, min(fits, slots * blocks_for(max_seq_len)))


def available_memory(device: str, local_ranks: int) -> tuple[int, str]:
    """(bytes one rank may use, where the figure comes from): a NeuronCore's HBM, or this host's
    MemAvailable shared by the ranks running on it."""
    if device == "neuron":
        return NEURON_CORE_HBM, "one NeuronCore's HBM (trn2, LNC=2)"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                total = int(line.split()[1]) * 1024
                break
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    share = f" shared by {local_ranks} ranks" if local_ranks > 1 else ""
    return total // local_ranks, f"this host's available memory{share}"


def check_fits(plan: MemoryPlan, available: int, where: str, max_seq_len: int | None = None) -> None:
    """Refuse, saying what the run needs and what there is, when the plan exceeds `available` or its KV pool
    cannot hold one request of `max_seq_len` positions."""
    if plan.total > available:
        raise ValueError(f"this run needs {_gib(plan.total)} per rank ({plan.describe()}) but {where} is "
                         f"{_gib(available)}: use fewer rows or a shorter --max-seq-len, more ranks, "
                         "or an expert subset")
    if max_seq_len is not None and plan.kv_blocks < blocks_for(max_seq_len):
        raise ValueError(f"the KV pool of {plan.kv_blocks:,} blocks ({plan.kv_blocks * KV_BLOCK:,} tokens) per "
                         f"attention group cannot hold one request of --max-seq-len {max_seq_len} ({plan.describe()}; "
                         f"{where}: {_gib(available)}): use a shorter --max-seq-len, more ranks, or an expert subset")
