"""MiniMax-M2 hyper-parameters, read from a Hugging Face config.json."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimax_m2.files import read_json


@dataclass(frozen=True)
class MiniMaxM2Config:
    """The numbers that define a MiniMaxM2ForCausalLM (defaults: the released MiniMax-M2)."""

    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 1536
    num_hidden_layers: int = 62
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    rotary_dim: int = 64
    rope_theta: float = 5e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 196608
    tie_word_embeddings: bool = False
    num_mtp_modules: int = 0
    fp8_block_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok {self.num_experts_per_tok} must be in [1, {self.num_local_experts}]"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MiniMaxM2Config":
        """Read the fields of a HF config dict, accepting both RoPE spellings; refuse variants not supported,
        missing keys and values of the wrong type, naming the key."""
        if not isinstance(raw, dict):
            raise ValueError("config.json must hold a JSON object")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(repr(k) for k in missing)}")
        for key, kind in _TYPES.items():
            value = raw.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
                raise ValueError(f"config.json: {key!r} is {value!r}, expected {'an integer' if kind is int else 'a number'}")
            if kind is int and value is not None and value < 1 and key not in ("rotary_dim",):
                raise ValueError(f"config.json: {key!r} is {value}, expected a positive integer")
        _refuse_unsupported(raw)
        rope = raw.get("rope_parameters") or {}
        head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
        rotary_dim = raw.get("rotary_dim") or int(head_dim * rope.get("partial_rotary_factor", 1.0))
        quant = raw.get("quantization_config")
        block = None
        if quant is not None:
            if quant.get("quant_method") != "fp8" or quant.get("fmt", "float8_e4m3fn") != "float8_e4m3fn":
                raise ValueError(f"unsupported quantization_config {quant}: only blockwise fp8 e4m3fn is supported")
            block = tuple(quant.get("weight_block_size") or (128, 128))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["num_key_value_heads"],
            head_dim=head_dim,
            num_local_experts=raw["num_local_experts"],
            num_experts_per_tok=raw["num_experts_per_tok"],
            rotary_dim=rotary_dim,
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta", 1e4)),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            max_position_embeddings=raw.get("max_position_embeddings", 196608),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            num_mtp_modules=raw.get("num_mtp_modules", 0) if raw.get("use_mtp", False) else 0,
            fp8_block_size=block,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MiniMaxM2Config":
        """Read `config.json` from a checkpoint directory."""
        return cls.from_dict(read_json(Path(path) / "config.json", "not a Hugging Face checkpoint directory"))


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "num_local_experts", "num_experts_per_tok")
_TYPES = {**{k: int for k in _REQUIRED}, "head_dim": int, "rotary_dim": int, "max_position_embeddings": int,
          "rope_theta": (int, float), "rms_norm_eps": (int, float)}


def _refuse_unsupported(raw: dict[str, Any]) -> None:
    """Raise for config values that would silently change the maths this port implements."""
    checks = {
        "scoring_func": ("sigmoid",),
        "qk_norm_type": ("per_layer",),
        "hidden_act": ("silu",),
    }
    for key, allowed in checks.items():
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"config {key}={raw[key]!r} is not supported (expected one of {allowed})")
    if raw.get("use_qk_norm") is False or raw.get("use_routing_bias") is False:
        raise ValueError("config without QK norm or routing bias is not a MiniMax-M2 variant this port supports")
    if raw.get("shared_intermediate_size", 0):
        raise ValueError("shared experts (shared_intermediate_size > 0) are not supported")
    if any(kind != 1 for kind in raw.get("attn_type_list", [])):
        raise ValueError("attn_type_list asks for linear-attention layers; only full attention (1) is supported")
    rope_type = (raw.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
