"""Tiny MiniMax-M2 checkpoints written by transformers itself, and its logits as the reference."""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import MiniMaxM2Config as HFConfig
from transformers import MiniMaxM2ForCausalLM

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", ".w1.", ".w2.", ".w3.")
FP8_MAX = 448.0


def tiny_config(**overrides) -> HFConfig:
    """A small MiniMax-M2: 16 experts top-4, partial RoPE, GQA, QK norm."""
    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=16,
        num_experts_per_tok=4,
        rotary_dim=8,
        rope_theta=5e6,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
    )
    values.update(overrides)
    return HFConfig(**values)


def build_model(config: HFConfig, seed: int = 0, bias_scale: float = 0.1,
                bias_shift: dict[int, float] | None = None) -> MiniMaxM2ForCausalLM:
    """transformers model with random weights, norm weights away from 1 and a non-zero router bias.

    bias_shift adds a constant to the bias of the given experts (to skew routing).
    """
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
        for layer in model.model.layers:
            bias = bias_scale * torch.randn(config.num_local_experts)
            for expert, shift in (bias_shift or {}).items():
                bias[expert] += shift
            layer.mlp.e_score_correction_bias.copy_(bias)
    return model


def save(model: MiniMaxM2ForCausalLM, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def write_fp8(src: Path, dst: Path, block: tuple[int, int] = (16, 16), shards: int = 2) -> Path:
    """Re-save a float32 hub checkpoint in the released FP8 layout.

    q/k/v/o_proj and expert w1/w2/w3 become float8_e4m3fn with a float32 `weight_scale_inv` per block
    (grid = ceil(shape / block)); norms and embeddings bfloat16; gate and bias float32; sharded with an index.
    """
    from safetensors import safe_open

    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    out = {}
    for key, value in tensors.items():
        if any(q in key for q in QUANTIZED):
            rows, cols = value.shape
            grid = (-(-rows // block[0]), -(-cols // block[1]))
            padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
            padded[:rows, :cols] = value
            blocks = padded.reshape(grid[0], block[0], grid[1], block[1])
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
            quant = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
            out[key] = quant.to(torch.float8_e4m3fn).contiguous()
            out[key.replace(".weight", ".weight_scale_inv")] = scale.float().contiguous()
        elif "gate" in key or "e_score_correction_bias" in key:
            out[key] = value.float().contiguous()
        else:
            out[key] = value.to(torch.bfloat16).contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    keys = sorted(out)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
        save_file({k: out[k] for k in part}, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "float8_e4m3fn",
        "quant_method": "fp8",
        "weight_block_size": list(block),
        "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def load(path: Path) -> MiniMaxM2ForCausalLM:
    """transformers' own load of a checkpoint directory, in float32.

    On CPU transformers dequantises FP8 weights itself; it keeps bfloat16 tensors in bfloat16, so
    they are upcast afterwards (exact).
    """
    return MiniMaxM2ForCausalLM.from_pretrained(path, dtype=torch.float32).float().eval()


@torch.no_grad()
def greedy_logits(model: MiniMaxM2ForCausalLM, ids: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers greedy decoding with its KV cache.

    Returns (tokens [B, prompt + steps], logits [B, prompt + steps - 1, vocab]): the prefill
    logits then those of each decode step.
    """
    out = model(torch.tensor(ids), use_cache=True)
    logits = [out.logits.numpy()]
    tokens = [ids]
    for step in range(steps):
        nxt = logits[-1][:, -1].argmax(axis=-1)[:, None]
        tokens.append(nxt)
        if step + 1 < steps:
            out = model(torch.tensor(nxt), past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits.numpy())
    return np.concatenate(tokens, axis=1), np.concatenate(logits, axis=1)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
