"""Model weights in the layout the kernels use (attention, router and lm_head matrices [in, out], the
attention's and the router's held in memory as the checkpoint's [out, in] rows; experts in the checkpoint's
[out, in], gate and up fused), from a checkpoint (layer by layer) or random."""

from dataclasses import dataclass, fields
from typing import Iterable

import ml_dtypes
import numpy as np
from tqdm import tqdm

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.checkpoint import Checkpoint, expert_key, layer_prefix


@dataclass
class LayerWeights:
    """One decoder layer on one rank. E = experts loaded (router columns), L = experts this rank holds
    (all E on one rank), I' = its part of their intermediate size I; Hq, Hkv = this rank's heads."""

    input_norm: np.ndarray  # [hidden]
    post_norm: np.ndarray  # [hidden]
    wq: np.ndarray  # [hidden, Hq*D]
    wk: np.ndarray  # [hidden, Hkv*D]
    wv: np.ndarray  # [hidden, Hkv*D]
    wo: np.ndarray  # [Hq*D, hidden]
    q_norm: np.ndarray  # [Hq*D]
    k_norm: np.ndarray  # [Hkv*D]
    gate: np.ndarray  # [hidden, E] router columns of the experts loaded
    bias: np.ndarray  # [E] e_score_correction_bias of the experts loaded
    w13: np.ndarray  # [L, 2I', hidden] gate (w1) rows then up (w3) rows, as the checkpoint stores them
    w2: np.ndarray  # [L, hidden, I']
    # With FP8 experts kept as stored, w13 and w2 hold float8_e4m3fn codes (uint8) and these their block
    # scales (`block_scales`, float32, [L, rows / r, cols / c]); None otherwise.
    w13_scale: np.ndarray | None = None
    w2_scale: np.ndarray | None = None


LAYER_WEIGHT_NAMES = tuple(f.name for f in fields(LayerWeights))
# An FP8 checkpoint's weights that stay 8-bit codes on the device: the experts. Its attention projections
# are dequantised when loaded: a layer reads every projection whole each step, so decoding them in the unit
# costs more element-wise work than their halved bytes save (benchmarks/roofline.py, section 6).
FP8_WEIGHTS = ("w13", "w2")
SCALES = tuple(f"{name}_scale" for name in FP8_WEIGHTS)
FLOAT32_WEIGHTS = ("gate", "bias") + SCALES  # the router and FP8 scales stay float32 whatever the model dtype
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def model_dtype(name: str) -> np.dtype:
    """'float32' or 'bfloat16' -> the NumPy dtype of weights and activations."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def cast_weight(name: str, value: np.ndarray | None, dtype: np.dtype) -> np.ndarray | None:
    """A layer weight in `dtype`, except the router's and FP8 scales, which stay float32, and FP8 codes,
    which stay as stored."""
    if value is None or value.dtype == np.uint8:
        return value
    return value.astype(np.float32 if name in FLOAT32_WEIGHTS else dtype, copy=False)


def _cast_layer(layer: LayerWeights, dtype: np.dtype) -> LayerWeights:
    return LayerWeights(**{name: cast_weight(name, value, dtype) for name, value in vars(layer).items()})


@dataclass
class ModelWeights:
    embed: np.ndarray  # [V / tp, hidden] this rank's rows of the vocabulary, zero-padded past vocab
    final_norm: np.ndarray  # [hidden]
    lm_head: np.ndarray  # [hidden, V / W] this rank's vocabulary columns, zero-padded past vocab
    layers: list[LayerWeights]

    def nbytes(self) -> int:
        """Resident bytes of every weight held (a tied lm_head is a copy of its columns in row order)."""
        arrays = [self.embed, self.final_norm, self.lm_head] + [a for layer in self.layers for a in vars(layer).values()
                                                                if a is not None]
        return sum(a.nbytes for a in arrays)


def _linear(weight: np.ndarray) -> np.ndarray:
    """HF [out, in] -> kernel [in, out]: the transpose of a contiguous copy of the [out, in] rows, as this CPU
    multiplies a few rows by it fastest (`kernels.attention._project`); a device copies it to its own
    layout."""
    return np.array(weight, order="C").T


def expert_part(w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, part: slice) -> tuple[np.ndarray, np.ndarray]:
    """One expert's HF [out, in] weights -> w13 [2I', hidden] (gate rows then up rows) and w2 [hidden, I'],
    keeping the `part` of the intermediate dimension (I' of I) a rank holds (experts stay [out, in])."""
    return np.concatenate([w1[part], w3[part]], axis=0), np.ascontiguousarray(w2[:, part])


def _fuse_experts(w1: list[np.ndarray], w3: list[np.ndarray], w2: list[np.ndarray],
                  part: slice) -> tuple[np.ndarray, np.ndarray]:
    """expert_part of every expert, stacked: w13 [E, 2I', hidden], w2 [E, hidden, I']."""
    parts = [expert_part(a, b, c, part) for a, b, c in zip(w1, w3, w2)]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


def dense_part(config: MiniMaxM2Config, layout: ParallelLayout, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A rank's non-expert LayerWeights fields from full HF-layout dense tensors (its heads, as copies,
    so the full projections are freed; router columns of the loaded experts)."""
    q = layout.head_slice(config.num_attention_heads, config.head_dim)
    kv = layout.head_slice(config.num_key_value_heads, config.head_dim)
    return dict(
        input_norm=hf["input_layernorm"],
        post_norm=hf["post_attention_layernorm"],
        wq=_linear(hf["q_proj"][q]),
        wk=_linear(hf["k_proj"][kv]),
        wv=_linear(hf["v_proj"][kv]),
        wo=_linear(hf["o_proj"][:, q]),
        q_norm=hf["q_norm"][q].copy(),
        k_norm=hf["k_norm"][kv].copy(),
        gate=_linear(hf["gate"]),
        bias=hf["bias"],
    )


def _layer(config: MiniMaxM2Config, layout: ParallelLayout, hf: dict[str, np.ndarray], w13: np.ndarray,
           w2: np.ndarray) -> LayerWeights:
    return LayerWeights(**dense_part(config, layout, hf), w13=w13, w2=w2)


def block_scales(grid: np.ndarray, block: tuple[int, int], shape: tuple[int, int], rows: slice,
                 cols: slice) -> np.ndarray:
    """The scales of the [rows, cols] part of an FP8 weight of `shape` [R, C] whose `block` scales (the
    checkpoint's weight_scale_inv) are `grid`: along each axis one per block where the part holds two or more
    whole blocks, else one per index (a slice cutting through blocks, such as the 24 intermediate rows each of
    64 ranks holds of a 128-row block, keeps each row's own block's scale; a single block is spread too, as no
    compiled input has a dimension of 1) -> [part rows / r, part cols / c] for `kernels.fp8.dequantize`."""
    def axis(size: int, part: slice, b: int) -> np.ndarray:
        start, stop, _ = part.indices(size)
        if start % b == 0 and (stop - start) % b == 0 and stop - start > b:
            return np.arange(start // b, stop // b)
        return np.arange(start, stop) // b

    return np.ascontiguousarray(grid[np.ix_(axis(shape[0], rows, block[0]), axis(shape[1], cols, block[1]))])


_ALL = slice(None)


FP8Tensor = tuple[np.ndarray, np.ndarray]  # float8_e4m3fn codes [out, in] and their weight_scale_inv grid


def read_fp8_expert(ckpt: Checkpoint, layer: int, expert: int) -> dict[str, FP8Tensor] | None:
    """One expert's w1, w3 and w2 as stored ({name: (codes, grid)}), or None when they are not all float8."""
    stored = {name: ckpt.read_fp8(expert_key(layer, expert, name)) for name in ("w1", "w3", "w2")}
    return None if any(v is None for v in stored.values()) else stored


def _fp8_part(stored: FP8Tensor, block: tuple[int, int], rows: slice, cols: slice) -> FP8Tensor:
    """The [rows, cols] part of a stored FP8 tensor: its codes and their scales (`block_scales`)."""
    codes, grid = stored
    return np.ascontiguousarray(codes[rows, cols]), block_scales(grid, block, codes.shape, rows, cols)


def fp8_expert_part(stored: dict[str, FP8Tensor], block: tuple[int, int], part: slice) -> dict[str, np.ndarray]:
    """An expert read by `read_fp8_expert` -> the `part` of its intermediate dimension as FP8 codes with their
    scales (w13, w13_scale, w2, w2_scale, as `expert_part` lays the weights out)."""
    w1, w3 = (_fp8_part(stored[name], block, part, _ALL) for name in ("w1", "w3"))
    w2, w2_scale = _fp8_part(stored["w2"], block, _ALL, part)
    return dict(w13=np.concatenate([w1[0], w3[0]]), w13_scale=np.concatenate([w1[1], w3[1]]), w2=w2,
                w2_scale=w2_scale)


def fp8_experts(ckpt: Checkpoint, layer: int, layout: ParallelLayout) -> dict[str, np.ndarray]:
    """This rank's experts (`ckpt.experts`, its intermediate slice) as FP8 codes with their scales, stacked,
    or {} when they are not all float8."""
    part = layout.intermediate_slice(ckpt.config.intermediate_size)
    parts = []
    for e in ckpt.experts:
        stored = read_fp8_expert(ckpt, layer, e)
        if stored is None:
            return {}
        parts.append(fp8_expert_part(stored, ckpt.config.fp8_block_size, part))
    return {name: np.stack([p[name] for p in parts]) for name in ("w13", "w13_scale", "w2", "w2_scale")}


_DENSE_KEYS = {
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
    "gate": "block_sparse_moe.gate.weight",
    "bias": "block_sparse_moe.e_score_correction_bias",
}


def read_dense(ckpt: Checkpoint, layer: int, experts: list[int]) -> dict[str, np.ndarray]:
    """A layer's non-expert tensors as stored (HF layout, float32), router rows of the loaded `experts`."""
    p = layer_prefix(layer)
    hf = {name: ckpt.read(p + key) for name, key in _DENSE_KEYS.items()}
    hf["gate"], hf["bias"] = hf["gate"][experts], hf["bias"][experts]
    return hf


def load_layer(ckpt: Checkpoint, layer: int, experts: list[int], layout: ParallelLayout,
               keep_fp8: bool = False) -> LayerWeights:
    """Read one decoder layer: router rows of all loaded `experts`, weights of this rank's experts
    (`ckpt.experts`), attention heads of this rank; with `keep_fp8`, experts an FP8 checkpoint stores as
    float8 stay FP8 codes with their scales (else they are dequantised, as everything else is)."""
    hf = read_dense(ckpt, layer, experts)
    kept = fp8_experts(ckpt, layer, layout) if keep_fp8 else {}
    if kept:
        return LayerWeights(**dense_part(ckpt.config, layout, hf), **kept)

    def expert_weights(name: str) -> list[np.ndarray]:
        return [ckpt.read(expert_key(layer, e, name)) for e in ckpt.experts]

    part = layout.intermediate_slice(ckpt.config.intermediate_size)
    w13, w2 = _fuse_experts(expert_weights("w1"), expert_weights("w3"), expert_weights("w2"), part)
    return LayerWeights(**dense_part(ckpt.config, layout, hf), w13=w13, w2=w2)


def vocab_rows(table: np.ndarray, parts: int, part: int) -> np.ndarray:
    """HF [vocab, hidden] embedding or lm_head -> rows of `part` of `parts` even parts [ceil(V / parts),
    hidden], zero-padded past the vocabulary (the table itself when there is one part)."""
    vocab = table.shape[0]
    width = -(-vocab // parts)
    start = min(part * width, vocab)
    rows = table[start : start + width]
    return rows if parts == 1 else np.pad(rows, ((0, width - rows.shape[0]), (0, 0)))


def embed_rows(embed: np.ndarray, layout: ParallelLayout) -> np.ndarray:
    """HF [vocab, hidden] embedding -> this rank's [V / tp, hidden] rows (its attention group looks up the
    same tokens, each rank in its part of the vocabulary)."""
    return vocab_rows(embed, layout.tp, layout.tp_rank)


def vocab_columns(lm_head: np.ndarray, layout: ParallelLayout) -> np.ndarray:
    """HF [vocab, hidden] lm_head (or tied embedding) -> this rank's [hidden, V / W] columns, zero-padded
    past the vocabulary, in row order (a CPU multiplies 16 rows by the medium config's lm_head in 15 ms so
    against 23.5 ms by a transposed view)."""
    return np.ascontiguousarray(vocab_rows(lm_head, layout.world, layout.rank).T)


def _model(embed: np.ndarray, final_norm: np.ndarray, lm_head_rows: np.ndarray, layers: list[LayerWeights],
           layout: ParallelLayout, dtype: np.dtype) -> ModelWeights:
    """The model-level weights of this rank: its rows of the embedding, its columns of the lm_head (of the
    embedding when tied)."""
    embed = embed.astype(dtype, copy=False)
    head = vocab_columns(embed if lm_head_rows is None else lm_head_rows.astype(dtype, copy=False), layout)
    return ModelWeights(embed_rows(embed, layout), final_norm.astype(dtype, copy=False), head, layers)


def _layers(count: int, progress: bool, what: str) -> Iterable[int]:
    return tqdm(range(count), desc=what, unit="layer", disable=not progress, leave=False, delay=2)


def load_model_weights(
    ckpt: Checkpoint, experts: list[int], layout: ParallelLayout, dtype: np.dtype = np.dtype(np.float32),
    progress: bool = False, keep_fp8: bool = False,
) -> ModelWeights:
    """Read the whole model, one layer at a time, each layer cast to `dtype` as soon as it is read (FP8
    weights kept as codes and scales with `keep_fp8`: `load_layer`)."""
    tied = ckpt.config.tie_word_embeddings
    layers = [_cast_layer(load_layer(ckpt, i, experts, layout, keep_fp8), dtype)
              for i in _layers(ckpt.config.num_hidden_layers, progress, "loading")]
    return _model(ckpt.read("model.embed_tokens.weight"), ckpt.read("model.norm.weight"),
                  None if tied else ckpt.read("lm_head.weight"), layers, layout, dtype)


def random_model_weights(
    config: MiniMaxM2Config, experts: list[int], seed: int, layout: ParallelLayout = ParallelLayout(),
    dtype: np.dtype = np.dtype(np.float32), progress: bool = False,
) -> ModelWeights:
    """Random weights of the right shapes (std 0.02 matrices, norms near 1, a non-zero router bias).

    Each expert draws from its own generator, so every rank of a layout builds exactly its part of
    the same model a single process builds."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim

    def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    def norm(rng: np.random.Generator, n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def layer(index: int) -> LayerWeights:
        rng = np.random.default_rng((seed, index, 0))
        hf = {
            "input_layernorm": norm(rng, hidden),
            "post_attention_layernorm": norm(rng, hidden),
            "q_proj": normal(rng, q_width, hidden),
            "k_proj": normal(rng, kv_width, hidden),
            "v_proj": normal(rng, kv_width, hidden),
            "o_proj": normal(rng, hidden, q_width),
            "q_norm": norm(rng, q_width),
            "k_norm": norm(rng, kv_width),
            "gate": normal(rng, config.num_local_experts, hidden)[experts],
            "bias": (0.01 * rng.standard_normal(config.num_local_experts)).astype(np.float32)[experts],
        }
        expert_rngs = [np.random.default_rng((seed, index, 1 + e)) for e in layout.local_experts(experts)]
        mats = [(normal(r, inter, hidden), normal(r, inter, hidden), normal(r, hidden, inter)) for r in expert_rngs]
        part = layout.intermediate_slice(inter)
        w13, w2 = _fuse_experts([m[0] for m in mats], [m[1] for m in mats], [m[2] for m in mats], part)
        return _cast_layer(_layer(config, layout, hf, w13, w2), dtype)

    rng = np.random.default_rng((seed,))
    embed = normal(rng, config.vocab_size, hidden)
    final_norm = norm(rng, hidden)
    lm_head = None if config.tie_word_embeddings else normal(rng, config.vocab_size, hidden)
    layers = [layer(i) for i in _layers(config.num_hidden_layers, progress, "building")]
    return _model(embed, final_norm, lm_head, layers, layout, dtype)


def fp8_scale_shapes(config: MiniMaxM2Config, num_experts: int, layout: ParallelLayout) -> dict[str, tuple]:
    """name -> shape of the FP8 experts' scales on one rank (`fp8_experts`), from the config's block size."""
    block = config.fp8_block_size
    hidden, inter = config.hidden_size, config.intermediate_size
    part = layout.intermediate_slice(inter)

    def scales(shape: tuple[int, int], rows: slice, cols: slice) -> tuple[int, ...]:
        grid = np.zeros((-(-shape[0] // block[0]), -(-shape[1] // block[1])), np.float32)
        return block_scales(grid, block, shape, rows, cols).shape

    local = num_experts // layout.moe_ep
    w1 = scales((inter, hidden), part, _ALL)
    return {"w13_scale": (local, 2 * w1[0], w1[1]), "w2_scale": (local, *scales((hidden, inter), _ALL, part))}


def rank_shapes(config: MiniMaxM2Config, num_experts: int, layout: ParallelLayout,
                dtype: np.dtype, fp8: bool = False) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(model-level, per-layer) name -> (shape, dtype) of one rank's weights with `num_experts` loaded,
    worked out from the config alone (nothing allocated); with `fp8` (an FP8 checkpoint's experts kept as
    stored), the experts as 8-bit codes with their float32 scales."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_width = config.num_attention_heads // layout.tp * head_dim
    kv_width = config.num_key_value_heads // layout.tp * head_dim
    local = num_experts // layout.moe_ep
    layer = {
        "input_norm": (hidden,), "post_norm": (hidden,), "wq": (hidden, q_width), "wk": (hidden, kv_width),
        "wv": (hidden, kv_width), "wo": (q_width, hidden), "q_norm": (q_width,), "k_norm": (kv_width,),
        "gate": (hidden, num_experts), "bias": (num_experts,), "w13": (local, 2 * inter // layout.moe_tp, hidden),
        "w2": (local, hidden, inter // layout.moe_tp),
    }
    model = {"embed": (layout.embed_rows(config.vocab_size), hidden), "final_norm": (hidden,),
             "lm_head": (hidden, layout.vocab_columns(config.vocab_size))}
    if fp8:
        layer.update(fp8_scale_shapes(config, num_experts, layout))

    def kind(name: str) -> np.dtype:
        if name in FLOAT32_WEIGHTS:
            return np.dtype(np.float32)
        return np.dtype(np.uint8) if fp8 and name in FP8_WEIGHTS else dtype

    return ({name: (shape, dtype) for name, shape in model.items()},
            {name: (shape, kind(name)) for name, shape in layer.items()})


def zero_model_weights(
    config: MiniMaxM2Config, experts: list[int], layout: ParallelLayout, dtype: np.dtype, num_layers: int = 1,
    fp8: bool = False,
) -> ModelWeights:
    """Zero weights of this rank's shapes (FP8 codes and scales with `fp8`), for sizing the device program
    at the real model's shapes: np.zeros maps untouched pages lazily, so only the weights a unit actually
    reads cost memory."""
    model, layer = rank_shapes(config, len(experts), layout, dtype, fp8)
    return ModelWeights(
        **{name: np.zeros(*spec) for name, spec in model.items()},
        layers=[LayerWeights(**{name: np.zeros(*spec) for name, spec in layer.items()}) for _ in range(num_layers)],
    )
