"""Logits of MiniMaxM2Model equal transformers' MiniMaxM2ForCausalLM on checkpoints it wrote."""

import json

import numpy as np
import pytest
from conftest import DECODE_STEPS, PROMPT
from hf_reference import build_model, greedy_logits, load, relative_error, save, tiny_config

from minimax_m2 import MiniMaxM2Model

RTOL = 1e-5


def _assert_matches(path, reference_model) -> None:
    want_tokens, want_logits = greedy_logits(reference_model, PROMPT, DECODE_STEPS)
    model = MiniMaxM2Model.from_pretrained(path, max_seq_len=64)
    tokens, logits = model.generate(PROMPT, max_new_tokens=DECODE_STEPS, return_logits=True)
    assert logits.shape == want_logits.shape
    prompt_len = PROMPT.shape[1]
    assert relative_error(logits[:, :prompt_len], want_logits[:, :prompt_len]) < RTOL, "prefill logits differ"
    for step in range(DECODE_STEPS - 1):
        at = prompt_len + step
        assert relative_error(logits[:, at], want_logits[:, at]) < RTOL, f"decode step {step + 1} logits differ"
    np.testing.assert_array_equal(tokens, want_tokens)


def test_float32_single_file(hf_model, float32_checkpoint) -> None:
    _assert_matches(float32_checkpoint, hf_model)


def test_float32_sharded(hf_model, sharded_checkpoint) -> None:
    assert (sharded_checkpoint / "model.safetensors.index.json").is_file()
    assert len(list(sharded_checkpoint.glob("*.safetensors"))) > 2
    _assert_matches(sharded_checkpoint, hf_model)


def test_fp8_blockwise(fp8_checkpoint) -> None:
    """Reference: transformers loading the same FP8 directory on CPU, which dequantises it."""
    index = json.loads((fp8_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in index
    _assert_matches(fp8_checkpoint, load(fp8_checkpoint))


def test_fp8_differs_from_float32(hf_model, fp8_checkpoint, float32_checkpoint) -> None:
    """The FP8 path really quantises: its logits are not the float32 ones (so the FP8 test can fail)."""
    ids = PROMPT[:, :3]
    fp8 = MiniMaxM2Model.from_pretrained(fp8_checkpoint, max_seq_len=8).forward(ids)
    f32 = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=8).forward(ids)
    assert relative_error(fp8, f32) > 1e-4


def test_small_tied_partial_rotary_factor(tmp_path) -> None:
    """MiniMax-M2-Small style: tied embeddings, RoPE given as partial_rotary_factor, 1 KV head."""
    config = tiny_config(
        tie_word_embeddings=True,
        rotary_dim=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=3,
    )
    reference = build_model(config, seed=3)
    path = save(reference, tmp_path / "small")
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rotary_dim", None)
    (path / "config.json").write_text(json.dumps(raw))
    _assert_matches(path, reference)


@pytest.mark.parametrize("seed", [1, 2])
def test_batch_rows_independent(float32_checkpoint, seed) -> None:
    """A row's logits do not depend on the other rows of the batch."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (3, 5))
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=16)
    batched = model.forward(ids)
    model.reset()
    alone = model.forward(ids[1:2])
    assert relative_error(batched[1:2], alone) < RTOL


@pytest.mark.parametrize("checkpoint", ["float32_checkpoint", "fp8_checkpoint"])
def test_bfloat16_model_stays_close_to_float32(request, checkpoint) -> None:
    """bf16 weights, activations and KV cache (the device dtype), router and statistics float32: on
    the float32 model's own tokens, every position's logits within 2e-2 relative."""
    path = request.getfixturevalue(checkpoint)
    ids, want = MiniMaxM2Model.from_pretrained(path, max_seq_len=64).generate(PROMPT, DECODE_STEPS, return_logits=True)
    model = MiniMaxM2Model.from_pretrained(path, max_seq_len=64, dtype="bfloat16")
    assert model.weights.layers[0].wq.dtype.name == "bfloat16" and model.weights.layers[0].gate.dtype == np.float32
    got = model.forward(ids[:, :-1])
    err = relative_error(got, want)
    print(f"bfloat16 vs float32 logits ({checkpoint}): {err:.2e}")
    assert err < 2e-2


def test_long_prompt_attended_in_tiles(hf_model, float32_checkpoint, monkeypatch) -> None:
    """A 450-token prompt prefilled in chunks of 128 and decoded, its keys attended in tiles of 128 positions
    (the online softmax, forced by a tiny score budget): every position's logits are transformers'."""
    from minimax_m2.device import step
    from minimax_m2.generation import Sampling
    from minimax_m2.serving.engine import Engine

    monkeypatch.setattr(step, "SCORE_TILE_BYTES", 1)
    assert step.kv_tile_for(128, 4, 512) == 128
    prompt = np.random.default_rng(5).integers(0, 256, (1, 450))
    want_tokens, want = greedy_logits(hf_model, prompt, DECODE_STEPS)
    engine = Engine(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=512), max_num_seqs=2,
                    prefill_chunk=128)
    result = engine.generate([prompt[0].tolist()], Sampling(max_new_tokens=DECODE_STEPS), keep_logits=True)[0]
    assert result.generated == want_tokens[0, 450:].tolist()
    assert relative_error(result.logits, want[0]) < RTOL
