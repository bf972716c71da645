"""One MiniMax-M2 decoder layer assembled from kernels."""

import numpy as np

from kernels import attention, moe_block, moe_block_ep, rmsnorm
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights import LayerWeights


def decoder_layer(
    h: np.ndarray,
    positions: np.ndarray,
    w: LayerWeights,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    rope: tuple[np.ndarray, np.ndarray],
    config: MiniMaxM2Config,
    kv_len: int,
    layout: ParallelLayout = ParallelLayout(),
) -> tuple[np.ndarray, np.ndarray]:
    """h: [B, S, hidden] at `positions` [S] -> (h [B, S, hidden], pairs dropped by expert dispatch);
    the layer's KV cache is written in place.

    h + attn(norm(h)), then + moe(norm(.)) — pre-norm residual blocks. Over several ranks, attention
    splits heads over the tp group and the MoE sends pairs to the experts' ranks.
    """
    batch, seq, hidden = h.shape
    attn, _, _ = attention(
        rmsnorm(h, w.input_norm, config.rms_norm_eps),
        positions,
        w.wq,
        w.wk,
        w.wv,
        w.wo,
        w.q_norm,
        w.k_norm,
        rope[0],
        rope[1],
        k_cache,
        v_cache,
        head_dim=config.head_dim,
        eps=config.rms_norm_eps,
        kv_len=kv_len,
        replica_groups=layout.tp_groups,
    )
    h = h + attn
    x = rmsnorm(h, w.post_norm, config.rms_norm_eps).reshape(batch * seq, hidden)
    top_k = config.num_experts_per_tok
    if layout.world == 1:
        moe, dropped = moe_block(x, w.gate, w.bias, w.w13, w.w2, top_k=top_k), np.zeros((), np.int32)
    else:
        moe, dropped = moe_block_ep(
            x, w.gate, w.bias, w.w13, w.w2, layout.expert_slots(top_k),
            top_k=top_k,
            capacity=layout.capacity(batch * seq, top_k, w.w13.shape[0]),
            ep_groups=layout.ep_groups,
            tp_groups=layout.tp_groups,
        )
    return h + moe.reshape(batch, seq, hidden), dropped
