"""MiniMaxM2Model: the whole causal LM with a fixed-size KV cache, from a checkpoint or random."""

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from kernels import rope_tables
from kernels.collectives import all_reduce
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.expert_schedule import (
    BLOCK_SIZES,
    PRODUCT_SIZES,
    ExpertCost,
    compiled_only,
    measure_block_times,
    measure_product_times,
    measured_table,
    runs_numpy,
)
from minimax_m2.device.program import (
    RankValues,
    Unit,
    copy_call,
    embedding_call,
    layer_call,
    layer_constants,
    layer_inputs,
    lm_head_call,
    run_on_cpu,
)
from minimax_m2.device.step import (
    KV_BLOCK,
    Step,
    StepOutput,
    batch_rows,
    cache_shape,
    group_rows,
    head_picks,
    kv_len_for,
    selected_rows,
    table_width,
    uniform_step,
)
from minimax_m2.experts import select_experts
from minimax_m2.parallel import ParallelLayout
from minimax_m2.sampling import check_sampling, next_tokens
from minimax_m2.weights.checkpoint import Checkpoint
from minimax_m2.weights.model_weights import ModelWeights, load_model_weights, model_dtype, random_model_weights
from minimax_m2.weights.prepare import load_prepared

_MEASURED: dict[tuple, ExpertCost] = {}  # this CPU's expert costs, by expert shapes, dtype and rank


def check_vocabulary(ids: np.ndarray, vocab_size: int) -> None:
    """Raise naming the token ids outside 0..vocab_size-1."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token ids {sorted(set(bad.tolist()))[:10]} are outside the vocabulary 0..{vocab_size - 1}")


class MiniMaxM2Model:
    """MiniMaxM2ForCausalLM inference on NumPy kernels, in one process or as one rank of a layout.

    With an expert subset, each layer's router chooses among the loaded experts only (the others are
    masked out before the top-k), so logits equal the full model's whenever the tokens' chosen experts
    are all loaded. Over several ranks every rank holds the same full-batch logits after each step.

    The KV cache holds `blocks` blocks of KV_BLOCK positions per attention group (`allocate`); every step
    (`run`) gives each of its rows its own positions and block table, so rows of different lengths share a
    step. `forward` and `generate` run a batch of equal-length prompts, row b owning the blocks of a whole
    context.

    Every step runs the device program's units (`minimax_m2.device.program`): embedding, one layer unit per
    layer, lm_head, each through `runner` (`run_on_cpu`: NumPy here; `minimax_m2.device.neuron.NeuronRunner`:
    compiled for a NeuronCore). Weights, activations and KV caches are in the weights' dtype (float32,
    or bfloat16 as on a NeuronCore); the router, norm statistics, softmax and logits stay float32. The
    expert schedule is chosen for the target by `expert_cost` (measured on this CPU unless set).
    """

    def __init__(
        self,
        config: MiniMaxM2Config,
        weights: ModelWeights,
        experts: list[int],
        max_seq_len: int = 4096,
        layout: ParallelLayout = ParallelLayout(),
    ):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.config = config
        self.weights = weights
        self.experts = experts
        self.max_seq_len = max_seq_len
        self.layout = layout
        self.dtype = weights.embed.dtype
        self.rope = tuple(t.astype(self.dtype) for t in rope_tables(max_seq_len, config.rotary_dim, config.rope_theta))
        self.rank_values = RankValues.of(config, layout)
        self.position = 0
        self.dropped_pairs = 0
        self.blocks = 0
        self._batch = 0
        self._caches: list[tuple[np.ndarray, np.ndarray]] = []
        self.owner: Any = None  # the serving Engine whose requests hold this cache, if one does
        self.runner: Callable[[Unit], Any] = run_on_cpu
        self.expert_cost: ExpertCost | None = None
        self.head_cost: ExpertCost | None = None  # this CPU's cost of the lm_head's product, when measured

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        experts: list[int] | None = None,
        max_seq_len: int = 4096,
        layout: ParallelLayout = ParallelLayout(),
        dtype: str = "float32",
        progress: bool = False,
        keep_fp8: bool = False,
    ) -> "MiniMaxM2Model":
        """Load a HF checkpoint directory (single file or sharded, float32/bfloat16/FP8), layer by layer;
        with a layout, only this rank's experts and attention heads. dtype: 'float32' or 'bfloat16';
        progress: a bar over the layers; keep_fp8: an FP8 checkpoint's float8 experts stay 8-bit codes with
        their block scales, dequantised inside the units (else at load, as its projections always are)."""
        config = MiniMaxM2Config.from_pretrained(path)
        chosen = select_experts(config, experts)
        layout.check(config, len(chosen))
        checkpoint = Checkpoint(path, config, layout.local_experts(chosen))
        weights = load_model_weights(checkpoint, chosen, layout, model_dtype(dtype), progress, keep_fp8)
        return cls(config, weights, chosen, max_seq_len, layout)

    @classmethod
    def from_prepared(cls, path: str | Path, max_seq_len: int = 4096, layout: ParallelLayout = ParallelLayout(),
                      verify: bool = True) -> "MiniMaxM2Model":
        """This rank's file of a directory written by prepare_weights.py, memory-mapped: no transposes and
        no copies; the model runs in the prepared dtype. The manifest must match the layout; with `verify`
        every tensor's checksum is checked (see `minimax_m2.weights.prepare.load_prepared`)."""
        config, experts, weights = load_prepared(path, layout, verify)
        return cls(config, weights, experts, max_seq_len, layout)

    @classmethod
    def random(
        cls,
        config: MiniMaxM2Config,
        seed: int = 0,
        experts: list[int] | None = None,
        max_seq_len: int = 4096,
        layout: ParallelLayout = ParallelLayout(),
        dtype: str = "float32",
        progress: bool = False,
    ) -> "MiniMaxM2Model":
        """A model with random weights of the config's shapes (the same model whatever the layout)."""
        chosen = select_experts(config, experts)
        layout.check(config, len(chosen))
        weights = random_model_weights(config, chosen, seed, layout, model_dtype(dtype), progress)
        return cls(config, weights, chosen, max_seq_len, layout)

    def allocate(self, blocks: int) -> None:
        """A KV cache of `blocks` blocks of KV_BLOCK positions per attention group (plus the scratch block), in
        every layer, zeroed."""
        shape = cache_shape(self.config, self.layout, blocks)
        self._caches = [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype))
                        for _ in range(self.config.num_hidden_layers)]
        self.blocks = blocks

    def reset(self) -> None:
        """Start `forward` again from position 0 (and zero the dropped-pair count)."""
        self.position = 0
        self.dropped_pairs = 0
        self._batch = 0

    @property
    def compiles(self) -> bool:
        """Whether the runner compiles the units (a device's, `NeuronRunner`), rather than running them as
        NumPy here (`run_on_cpu`, or anything calling it)."""
        return getattr(self.runner, "compiles", False)

    @property
    def on_cpu(self) -> bool:
        """Whether NumPy runs this model's units here at this CPU's costs (no device runner, no NeuronCore's
        costs emulated): then no shape is a compiled program, and every shape is free."""
        return not self.compiles and runs_numpy(self.expert_cost)

    def schedule_cost(self) -> ExpertCost:
        """The target's cost of one expert over n rows: `expert_cost` when set, else measured on this CPU
        for experts of this model's shapes, once per process and rank (averaged over the ranks, so that
        every rank runs the same program, and reused, so that equal models choose equal schedules). Under a
        device runner the costs are a compiled target's whatever they were measured on: the runner compiles
        every unit, so none may take a schedule only NumPy runs."""
        if self.expert_cost is None:
            layer = self.weights.layers[0]
            key = (layer.w13.shape, layer.w2.shape, str(layer.w13.dtype), self.layout.world, self.layout.rank)
            if key not in _MEASURED:
                fp8 = [None if w.w13_scale is None else (w.w13_scale, w.w2_scale) for w in self.weights.layers]
                timed = measure_block_times([(w.w13, w.w2, scales) for w, scales in zip(self.weights.layers, fp8)],
                                            self.dtype)
                times = all_reduce(np.array([timed[b] for b in BLOCK_SIZES]), self.layout.world_groups)
                _MEASURED[key] = measured_table({b: tuple(t) for b, t in zip(BLOCK_SIZES, times / self.layout.world)},
                                                dynamic=True)
            self.expert_cost = _MEASURED[key]
            self.head_cost = self._measured_head_cost()
        return compiled_only(self.expert_cost) if self.compiles else self.expert_cost

    def _measured_head_cost(self) -> ExpertCost:
        """This CPU's cost of the lm_head's product over n rows (which chooses whether a few rows multiply it
        one at a time, `rows_apart`), measured once per process and rank and averaged over the ranks, as the
        experts' are."""
        head = self.weights.lm_head
        key = ("lm_head", head.shape, str(head.dtype), self.layout.world, self.layout.rank)
        if key not in _MEASURED:
            timed = measure_product_times(head, self.dtype)
            times = all_reduce(np.array([timed[n] for n in PRODUCT_SIZES]), self.layout.world_groups)
            _MEASURED[key] = measured_table(dict(zip(PRODUCT_SIZES, times / self.layout.world)), dynamic=True)
        return _MEASURED[key]

    def run(self, step: Step) -> StepOutput:
        """One step: every layer over the step's rows, each continuing its own cache row -> the next tokens
        [dp * R, K] int32 at the selected positions of every row (with their log-probabilities and their
        logits [dp * R, K, vocab] float32 when the step asks for them), identical on every rank. Padding rows
        and tokens are left out of the experts; their results are meaningless."""
        layout, config = self.layout, self.config
        check_vocabulary(step.input_ids, config.vocab_size)
        if np.any(step.positions < 0) or np.any(step.positions >= self.max_seq_len):
            raise ValueError(f"positions must lie in 0..{self.max_seq_len - 1} (max_seq_len {self.max_seq_len})")
        blocks = step.kv_tiles[..., 1] if step.kv_tiles is not None else \
            step.spread.tables if step.spread is not None else step.block_tables
        if np.any(blocks < 0) or np.any(blocks > self.blocks):
            raise ValueError(f"cache blocks must lie in 0..{self.blocks} (the last is scratch)")
        if step.spread is not None and (np.any(step.spread.written < 0) or
                                        np.any(step.spread.written >= (self.blocks + 1) * KV_BLOCK)):
            raise ValueError(f"cache positions written must lie in 0..{(self.blocks + 1) * KV_BLOCK - 1}")
        picks = self._head_picks(step)
        embedding, layer, head = self._calls(step, picks)
        h = self.runner(embedding)
        for index in range(config.num_hidden_layers):
            h = self.runner(layer(h, index))
            if isinstance(h, tuple):  # the schedule's capacity is below the worst case: drops are counted
                h, dropped = h
                self.dropped_pairs += int(all_reduce(np.asarray(dropped)[:1], layout.world_groups)[0])
        out = self.runner(head(h))
        rows, chosen = step.input_ids.shape[0] // layout.dp, step.selected.shape[1]
        outputs = [selected_rows(np.asarray(a), layout.dp, rows, chosen, picks).reshape(rows * layout.dp, chosen, -1)
                   for a in (out if isinstance(out, tuple) else (out,))]
        return StepOutput(outputs[0][:, :, 0], outputs[-1] if step.return_logits else None,
                          (outputs[1][:, :, 0], outputs[2], outputs[3]) if step.logprobs else None)

    def programs(self, step: Step) -> list[Unit]:
        """The distinct programs a step runs (embedding, the layer unit every layer shares, lm_head), with
        placeholder hidden states: what a device compiles for this step's shape (the lm_head taking every
        selected token, as a compiled one does)."""
        embedding, layer, head = self._calls(step, None)
        placeholder = np.zeros((embedding.inputs["input_ids"].shape[0], self.config.hidden_size), self.dtype)
        return [embedding, layer(placeholder, 0), head(placeholder)]

    def _calls(self, step: Step, picks: np.ndarray | None
               ) -> tuple[Unit, Callable[[Any, int], Unit], Callable[[Any], Unit]]:
        """A step's embedding unit, its layer unit for (h, layer index) and its lm_head unit for h, taking the
        selected tokens at `picks` (`_head_picks`; None: every one)."""
        layout, config = self.layout, self.config
        union, real = layout.union_tokens(step.bucket, step.token_valid, step.max_tokens)
        kv_len = step.kv_len or kv_len_for(step.kv_length, self.max_seq_len)
        seq = step.input_ids.shape[1]
        mine = step.input_ids[group_rows(step, layout)].reshape(-1)
        cost = self.schedule_cost()
        constants = layer_constants(config, layout, real, seq, kv_len,
                                    self.weights.layers[0].w13.shape[0], cost, mine.size, step.spread is not None)
        phase = "decode" if seq == 1 else "prefill"

        def layer(h: Any, index: int) -> Unit:
            inputs = layer_inputs(h, step, layout, union, self.rank_values, self.rope, self._caches[index],
                                  self.weights.layers[index], kv_len)
            return layer_call(phase, inputs, constants)

        embedding = embedding_call(mine, self.weights, self.rank_values, layout)
        head = self.head_cost if self.head_cost is not None and not self.compiles else cost
        return embedding, layer, lambda h: lm_head_call(h, step, self.weights, self.rank_values, config, layout, head,
                                                        picks)

    def _head_picks(self, step: Step) -> np.ndarray | None:
        """The selected tokens the lm_head takes: on this CPU, where no shape is compiled, only the real ones
        (`head_picks`); None: all of them."""
        return head_picks(step, self.layout.dp) if self.on_cpu and step.spread is None else None

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy cache blocks, (attention group, source block, target block) each, in every layer: a request
        continuing a prefix whose last block another request holds (copy on write). Every rank runs the same
        unit; a rank whose group copies nothing copies its scratch block onto itself."""
        for group, source, target in copies:
            if group != self.layout.group:
                source = target = self.blocks
            for caches in self._caches:
                self.runner(self._copy_call(caches, source, target))

    def copy_program(self) -> Unit:
        """The program `copy_blocks` runs (the scratch block onto itself): what a device compiles for it."""
        return self._copy_call(self._caches[0], self.blocks, self.blocks)

    @staticmethod
    def _copy_call(caches: tuple[np.ndarray, np.ndarray], source: int, target: int) -> Unit:
        within = np.arange(KV_BLOCK, dtype=np.int32)
        return copy_call(caches, np.int32(source * KV_BLOCK) + within, np.int32(target * KV_BLOCK) + within)

    def _check_input(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be a non-empty integer array [batch, seq], got {ids.dtype} {ids.shape}")
        check_vocabulary(ids, self.config.vocab_size)
        if self.position + ids.shape[1] > self.max_seq_len:
            raise ValueError(
                f"{ids.shape[1]} tokens at position {self.position} exceed max_seq_len {self.max_seq_len}"
            )
        if self.position and ids.shape[0] != self._batch:
            raise ValueError(f"batch size {ids.shape[0]} differs from the cached batch {self._batch}; reset() first")
        return ids

    def forward(self, input_ids: np.ndarray, all_logits: bool = True) -> np.ndarray:
        """int [batch, seq] -> float32 logits [batch, seq, vocab] (or [batch, 1, vocab] for the last
        position when all_logits is False); continues from the KV cache (row b in cache row b)."""
        return self._run(input_ids, all_logits)[0]

    def _run(self, input_ids: np.ndarray, all_logits: bool) -> tuple[np.ndarray, np.ndarray]:
        """forward, also returning the lm_head unit's greedy tokens [batch, seq or 1].

        Over several ranks, each attention group runs its share of the batch rows (padded to a
        multiple of the group count; padding rows never reach the experts) and the lm_head unit
        gathers the whole batch on every rank.
        """
        ids = self._check_input(input_ids)
        batch, seq = ids.shape
        rows = self.layout.rows_per_group(batch)
        if self.blocks < rows * table_width(self.max_seq_len):
            self.allocate(rows * table_width(self.max_seq_len))
        self._batch = batch
        step = uniform_step(batch, seq, self.position, self.layout, self.max_seq_len, ids, all_logits)
        out = self.run(step)
        self.position += seq
        rows = batch_rows(batch, self.layout, seq)
        return out.logits[rows], out.ids[rows]

    def generate_steps(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        all_logits: bool = False,
        eos_token_ids: tuple[int, ...] = (),
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """From an empty cache, yield (next tokens [batch, 1], logits of the forward that chose them)
        once per new token: the prefill's logits ([batch, prompt, vocab], or its last position only
        unless all_logits), then each decode step's [batch, 1, vocab].

        A row that produced one of `eos_token_ids` is finished: its later tokens repeat the first EOS id,
        and generation stops when every row is finished."""
        ids = np.asarray(input_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if ids.ndim == 2 and ids.shape[1] + max_new_tokens - 1 > self.max_seq_len:
            raise ValueError(
                f"prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens exceeds max_seq_len {self.max_seq_len}"
            )
        check_sampling(temperature, top_k, top_p)
        rng = np.random.default_rng(seed)
        self.reset()
        logits, greedy = self._run(ids, all_logits)
        finished = np.zeros(ids.shape[0], bool)
        for step in range(max_new_tokens):
            if temperature == 0:
                tokens = greedy[:, -1:].astype(np.int64)
            else:
                tokens = next_tokens(logits[:, -1], temperature, top_k, top_p, rng.random(len(logits)))[:, None]
            if eos_token_ids:
                tokens = np.where(finished[:, None], eos_token_ids[0], tokens)
                finished |= np.isin(tokens[:, 0], eos_token_ids)
            yield tokens, logits
            if finished.all() and eos_token_ids:
                return
            if step + 1 < max_new_tokens:
                logits, greedy = self._run(tokens, True)

    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        return_logits: bool = False,
        eos_token_ids: tuple[int, ...] = (),
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Prompt [batch, prompt] -> ids [batch, prompt + new], from an empty cache: new = max_new_tokens,
        or fewer when every row reached one of `eos_token_ids` (see generate_steps).

        With return_logits, also the float32 logits at every fed position,
        [batch, prompt + max_new_tokens - 1, vocab] (prefill positions, then each decode step).
        """
        steps = list(self.generate_steps(input_ids, max_new_tokens, temperature, top_k, top_p, seed, return_logits,
                                         eos_token_ids))
        ids = np.concatenate([np.asarray(input_ids)] + [tokens for tokens, _ in steps], axis=1)
        if not return_logits:
            return ids
        return ids, np.concatenate([logits for _, logits in steps], axis=1)
