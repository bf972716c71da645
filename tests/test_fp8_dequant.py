"""Blockwise FP8 decoding, including grids that do not divide the weight (ceil of shape / block)."""

import json

import numpy as np
import torch
from safetensors.torch import save_file

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.weights.checkpoint import Checkpoint
from minimax_m2.weights.safetensors_file import SafetensorsFile


def test_every_e4m3fn_pattern_decodes_like_torch(tmp_path) -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    halves = torch.randn(7, 5).bfloat16()
    save_file({"x": codes, "y": halves}, tmp_path / "f.safetensors")
    f = SafetensorsFile(tmp_path / "f.safetensors")
    want, got = codes.float().numpy(), f.read("x")
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(f.read("y"), halves.float().numpy())


def test_ceil_grid_dequantisation(tmp_path) -> None:
    """A [40, 24] weight with 16x16 blocks has a [3, 2] scale grid; each element uses its block's scale."""
    config = MiniMaxM2Config(
        vocab_size=8, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=1, num_experts_per_tok=1, rotary_dim=4,
        fp8_block_size=(16, 16),
    )
    rng = torch.Generator().manual_seed(0)
    codes = torch.randn(40, 24, generator=rng).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, generator=rng) + 0.5
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    tensors = {key: codes, key + "_scale_inv": scale}
    shapes = {"w2": (24, 40), "w3": (40, 24)}
    for name, shape in shapes.items():
        tensors[key.replace("w1", name)] = torch.zeros(shape)
    p = "model.layers.0."
    for name, shape in {
        "input_layernorm.weight": (24,), "post_attention_layernorm.weight": (24,),
        "self_attn.q_proj.weight": (16, 24), "self_attn.k_proj.weight": (8, 24), "self_attn.v_proj.weight": (8, 24),
        "self_attn.o_proj.weight": (24, 16), "self_attn.q_norm.weight": (16,), "self_attn.k_norm.weight": (8,),
        "block_sparse_moe.gate.weight": (1, 24), "block_sparse_moe.e_score_correction_bias": (1,),
    }.items():
        tensors[p + name] = torch.zeros(shape)
    tensors.update({"model.embed_tokens.weight": torch.zeros(8, 24), "model.norm.weight": torch.zeros(24),
                    "lm_head.weight": torch.zeros(8, 24)})
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({}))
    got = Checkpoint(tmp_path, config, [0]).read(key)
    want = np.empty((40, 24), np.float32)
    for r in range(40):
        for c in range(24):
            want[r, c] = codes[r, c].float() * scale[r // 16, c // 16]
    assert np.array_equal(got, want)
