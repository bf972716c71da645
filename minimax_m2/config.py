"""MiniMax-M2 hyper-parameters, read from a Hugging Face config.json (or a prepared manifest), checked by
type and range before anything is sized from them."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from minimax_m2 import checks
from minimax_m2.weights.files import read_json


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
    def from_dict(cls, raw: Any, source: str = "config.json") -> "MiniMaxM2Config":
        """Read the fields of a HF config dict, accepting both RoPE spellings; refuse variants not supported,
        missing keys and values of the wrong type or range, naming `source` and the key."""
        raw = checks.mapping(source, raw)
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(repr(k) for k in missing)}")

        def get(key: str, default: Any = None, check: Callable | None = None) -> Any:
            value = raw.get(key)
            if value is None:
                return default
            return check(f"{source}: {key!r}", value) if check else value

        _refuse_unsupported(raw, source, get)
        rope = get("rope_parameters", {}, checks.mapping)
        where = f"{source}: 'rope_parameters'"
        hidden, heads = _FIELDS["hidden_size"](f"{source}: 'hidden_size'", raw["hidden_size"]), \
            _FIELDS["num_attention_heads"](f"{source}: 'num_attention_heads'", raw["num_attention_heads"])
        head_dim = get("head_dim", None, _FIELDS["head_dim"]) or hidden // heads
        partial = checks.number(f"{where}['partial_rotary_factor']", rope.get("partial_rotary_factor", 1.0), 0, 1)
        rotary_dim = get("rotary_dim", None, _FIELDS["rotary_dim"]) or int(head_dim * partial)
        theta = get("rope_theta") if raw.get("rope_theta") is not None else rope.get("rope_theta", 1e4)
        quant = get("quantization_config", None, checks.mapping)
        block = None
        if quant is not None:
            if quant.get("quant_method") != "fp8" or quant.get("fmt", "float8_e4m3fn") != "float8_e4m3fn":
                raise ValueError(f"{source}: unsupported quantization_config {quant}: only blockwise fp8 e4m3fn is "
                                 "supported")
            size = quant.get("weight_block_size") or [128, 128]
            if not isinstance(size, list) or len(size) != 2:
                raise ValueError(f"{source}: 'quantization_config.weight_block_size' is {size!r}, "
                                 "expected [rows, cols]")
            block = tuple(checks.integer(f"{source}: 'quantization_config.weight_block_size'", n, 1, 1 << 16)
                          for n in size)
        use_mtp = get("use_mtp", False, checks.boolean)
        record = dict(
            vocab_size=raw["vocab_size"], hidden_size=hidden, intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=raw["num_key_value_heads"], head_dim=head_dim,
            num_local_experts=raw["num_local_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
            rotary_dim=rotary_dim, rope_theta=theta, rms_norm_eps=get("rms_norm_eps", 1e-6),
            max_position_embeddings=get("max_position_embeddings", 196608),
            tie_word_embeddings=get("tie_word_embeddings", False),
            num_mtp_modules=get("num_mtp_modules", 0) if use_mtp else 0,
            fp8_block_size=list(block) if block else None,
        )
        return cls.from_record(record, source)

    @classmethod
    def from_record(cls, record: Any, source: str) -> "MiniMaxM2Config":
        """The config from its own field names (as `record()` writes them), every field checked."""
        record = checks.mapping(source, record)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown, missing = sorted(set(record) - set(names)), [n for n in names if n not in record]
        if unknown or missing:
            raise ValueError(f"{source}: config fields {'unknown: ' + str(unknown) if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}{'missing: ' + str(missing) if missing else ''}")
        values = {name: _FIELDS[name](f"{source}: {name!r}", record[name]) for name in names}
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    def record(self) -> dict[str, Any]:
        """The fields as plain JSON values (from_record reads them back)."""
        values = dataclasses.asdict(self)
        values["fp8_block_size"] = list(self.fp8_block_size) if self.fp8_block_size else None
        return values

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MiniMaxM2Config":
        """Read `config.json` from a checkpoint directory."""
        file = Path(path) / "config.json"
        return cls.from_dict(read_json(file, "not a Hugging Face checkpoint directory"), str(file))


def _block(where: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(f"{where} is {value!r}, expected null or [rows, cols]")
    return tuple(checks.integer(where, n, 1, 1 << 16) for n in value)


def _size(high: int) -> Callable[[str, Any], int]:
    return lambda where, value: checks.integer(where, value, 1, high)


_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "vocab_size": _size(1 << 22),
    "hidden_size": _size(1 << 16),
    "intermediate_size": _size(1 << 17),
    "num_hidden_layers": _size(1024),
    "num_attention_heads": _size(1024),
    "num_key_value_heads": _size(1024),
    "head_dim": _size(4096),
    "num_local_experts": _size(1 << 16),
    "num_experts_per_tok": _size(1024),
    "rotary_dim": _size(4096),
    "rope_theta": lambda where, value: checks.number(where, value, 0, 1e15),
    "rms_norm_eps": lambda where, value: checks.number(where, value, 0, 1),
    "max_position_embeddings": _size(1 << 24),
    "tie_word_embeddings": checks.boolean,
    "num_mtp_modules": lambda where, value: checks.integer(where, value, 0, 64),
    "fp8_block_size": _block,
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


def _refuse_unsupported(raw: dict[str, Any], source: str, get: Callable) -> None:
    """Raise for config values that would silently change the maths this port implements."""
    allowed = {"scoring_func": ("sigmoid",), "qk_norm_type": ("per_layer",), "hidden_act": ("silu",)}
    for key, values in allowed.items():
        if key in raw and raw[key] not in values:
            raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (expected one of {values})")
    if get("use_qk_norm", True, checks.boolean) is False or get("use_routing_bias", True, checks.boolean) is False:
        raise ValueError(f"{source}: a config without QK norm or routing bias is not a MiniMax-M2 variant this port "
                         "supports")
    if get("shared_intermediate_size", 0, lambda w, v: checks.integer(w, v, 0)):
        raise ValueError(f"{source}: shared experts (shared_intermediate_size > 0) are not supported")
    kinds = get("attn_type_list", [])
    if not isinstance(kinds, list) or any(kind != 1 for kind in kinds):
        raise ValueError(f"{source}: attn_type_list {kinds!r} asks for linear-attention layers; only full attention "
                         "(1) is supported")
    rope = get("rope_parameters", {}, checks.mapping)
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source}: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
