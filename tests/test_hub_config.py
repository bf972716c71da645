"""The real MiniMaxAI/MiniMax-M2 config.json (../shared/fixtures) parses to the checkpoint's true
dimensions, and the tensors it implies are exactly the 96,103 the hub checkpoint holds."""

from pathlib import Path

import pytest

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.weights.checkpoint import global_shapes, layer_shapes

HUB_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimax_m2_hub"
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")


@pytest.fixture(scope="module")
def config() -> MiniMaxM2Config:
    if not (HUB_DIR / "config.json").is_file():
        pytest.skip(f"{HUB_DIR} is absent: the hub config fixture ships in ../shared beside the repository")
    return MiniMaxM2Config.from_pretrained(HUB_DIR)


def test_dimensions(config: MiniMaxM2Config) -> None:
    c = config
    shape = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert shape == (3072, 62, 48, 8, 128)
    assert (c.vocab_size, c.num_local_experts, c.num_experts_per_tok, c.intermediate_size) == (200064, 256, 8, 1536)
    assert (c.rotary_dim, c.rope_theta, c.tie_word_embeddings, c.fp8_block_size) == (64, 5e6, False, (128, 128))


def test_every_hub_tensor_is_expected(config: MiniMaxM2Config) -> None:
    """3 global tensors + 62 layers x (10 dense + 768 expert weights + 772 float8 scales) = 96,103."""
    shapes = global_shapes(config)
    for layer in range(config.num_hidden_layers):
        shapes.update(layer_shapes(config, layer, list(range(config.num_local_experts))))
    scales = {k + "_scale_inv": tuple(-(-n // 128) for n in s)
              for k, s in shapes.items() if k.split(".")[-2] in QUANTIZED}
    assert len(shapes) + len(scales) == 96103
    assert scales["model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv"] == (12, 24)
    assert scales["model.layers.0.block_sparse_moe.experts.0.w2.weight_scale_inv"] == (24, 12)
    assert scales["model.layers.0.self_attn.q_proj.weight_scale_inv"] == (48, 24)
    assert scales["model.layers.0.self_attn.o_proj.weight_scale_inv"] == (24, 48)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (6144,)
