"""Model weights in the layout the kernels use ([in, out] matrices, fused expert gate/up), from a
checkpoint (layer by layer) or random."""

from dataclasses import dataclass

import numpy as np

from minimax_m2.checkpoint import Checkpoint, expert_key, layer_prefix
from minimax_m2.config import MiniMaxM2Config


@dataclass
class LayerWeights:
    """One decoder layer. E = experts held, in ascending id order (`experts`)."""

    input_norm: np.ndarray  # [hidden]
    post_norm: np.ndarray  # [hidden]
    wq: np.ndarray  # [hidden, Hq*D]
    wk: np.ndarray  # [hidden, Hkv*D]
    wv: np.ndarray  # [hidden, Hkv*D]
    wo: np.ndarray  # [Hq*D, hidden]
    q_norm: np.ndarray  # [Hq*D]
    k_norm: np.ndarray  # [Hkv*D]
    gate: np.ndarray  # [hidden, E] router columns of the experts held
    bias: np.ndarray  # [E] e_score_correction_bias of the experts held
    w13: np.ndarray  # [E, hidden, 2I] gate (w1) then up (w3)
    w2: np.ndarray  # [E, I, hidden]


@dataclass
class ModelWeights:
    embed: np.ndarray  # [vocab, hidden]
    final_norm: np.ndarray  # [hidden]
    lm_head: np.ndarray  # [hidden, vocab] (a view of embed.T when tied)
    layers: list[LayerWeights]


def _linear(weight: np.ndarray) -> np.ndarray:
    """HF [out, in] -> kernel [in, out], contiguous."""
    return np.ascontiguousarray(weight.T)


def _fuse_experts(w1: list[np.ndarray], w3: list[np.ndarray], w2: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    w13 = np.stack([np.concatenate([_linear(a), _linear(b)], axis=1) for a, b in zip(w1, w3)])
    return np.ascontiguousarray(w13), np.stack([_linear(w) for w in w2])


def load_layer(ckpt: Checkpoint, layer: int) -> LayerWeights:
    """Read one decoder layer (only the selected experts) from a validated checkpoint."""
    p = layer_prefix(layer)
    experts = ckpt.experts

    def expert_weights(name: str) -> list[np.ndarray]:
        return [ckpt.read(expert_key(layer, e, name)) for e in experts]

    w13, w2 = _fuse_experts(expert_weights("w1"), expert_weights("w3"), expert_weights("w2"))
    return LayerWeights(
        input_norm=ckpt.read(f"{p}input_layernorm.weight"),
        post_norm=ckpt.read(f"{p}post_attention_layernorm.weight"),
        wq=_linear(ckpt.read(f"{p}self_attn.q_proj.weight")),
        wk=_linear(ckpt.read(f"{p}self_attn.k_proj.weight")),
        wv=_linear(ckpt.read(f"{p}self_attn.v_proj.weight")),
        wo=_linear(ckpt.read(f"{p}self_attn.o_proj.weight")),
        q_norm=ckpt.read(f"{p}self_attn.q_norm.weight"),
        k_norm=ckpt.read(f"{p}self_attn.k_norm.weight"),
        gate=_linear(ckpt.read(f"{p}block_sparse_moe.gate.weight")[experts]),
        bias=ckpt.read(f"{p}block_sparse_moe.e_score_correction_bias")[experts],
        w13=w13,
        w2=w2,
    )


def load_model_weights(ckpt: Checkpoint) -> ModelWeights:
    """Read the whole model, one layer at a time."""
    embed = ckpt.read("model.embed_tokens.weight")
    lm_head = embed.T if ckpt.config.tie_word_embeddings else _linear(ckpt.read("lm_head.weight"))
    return ModelWeights(
        embed=embed,
        final_norm=ckpt.read("model.norm.weight"),
        lm_head=lm_head,
        layers=[load_layer(ckpt, i) for i in range(ckpt.config.num_hidden_layers)],
    )


def random_model_weights(config: MiniMaxM2Config, experts: list[int], seed: int) -> ModelWeights:
    """Random weights of the right shapes (std 0.02 matrices, norms near 1, a non-zero router bias)."""
    rng = np.random.default_rng(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim

    def normal(*shape: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def layer() -> LayerWeights:
        gate = normal(config.num_local_experts, hidden)
        bias = (0.01 * rng.standard_normal(config.num_local_experts)).astype(np.float32)
        w1 = [normal(inter, hidden) for _ in experts]
        w3 = [normal(inter, hidden) for _ in experts]
        w13, w2 = _fuse_experts(w1, w3, [normal(hidden, inter) for _ in experts])
        return LayerWeights(
            input_norm=norm(hidden),
            post_norm=norm(hidden),
            wq=normal(hidden, q_width),
            wk=normal(hidden, kv_width),
            wv=normal(hidden, kv_width),
            wo=normal(q_width, hidden),
            q_norm=norm(q_width),
            k_norm=norm(kv_width),
            gate=_linear(gate[experts]),
            bias=bias[experts],
            w13=w13,
            w2=w2,
        )

    embed = normal(config.vocab_size, hidden)
    return ModelWeights(
        embed=embed,
        final_norm=norm(hidden),
        lm_head=embed.T if config.tie_word_embeddings else normal(hidden, config.vocab_size),
        layers=[layer() for _ in range(config.num_hidden_layers)],
    )
