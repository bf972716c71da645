"""A Hugging Face MiniMax-M2 checkpoint directory: which file holds which tensor, and the rule for every key.

Every key in the checkpoint is either used, or ignored by a named rule (unselected experts, MTP
modules, a tied lm_head); anything else, a missing key or a wrong shape is a `CheckpointError`
naming the key, raised before any weight is read.
"""

import os
import re
from pathlib import Path

import numpy as np

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.weights.files import read_json
from minimax_m2.weights.safetensors_file import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_KEY = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.(weight|weight_scale_inv)")
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that does not hold exactly the tensors the config asks for."""


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_key(layer: int, expert: int, name: str) -> str:
    """Key of expert weight `name` (w1, w2 or w3) in a layer."""
    return f"{layer_prefix(layer)}block_sparse_moe.experts.{expert}.{name}.weight"


def layer_shapes(config: MiniMaxM2Config, layer: int, experts: list[int]) -> dict[str, tuple[int, ...]]:
    """Expected key -> shape of one decoder layer, for the experts loaded."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    p = layer_prefix(layer)
    shapes = {
        f"{p}input_layernorm.weight": (hidden,),
        f"{p}post_attention_layernorm.weight": (hidden,),
        f"{p}self_attn.q_proj.weight": (q_width, hidden),
        f"{p}self_attn.k_proj.weight": (kv_width, hidden),
        f"{p}self_attn.v_proj.weight": (kv_width, hidden),
        f"{p}self_attn.o_proj.weight": (hidden, q_width),
        f"{p}self_attn.q_norm.weight": (q_width,),
        f"{p}self_attn.k_norm.weight": (kv_width,),
        f"{p}block_sparse_moe.gate.weight": (config.num_local_experts, hidden),
        f"{p}block_sparse_moe.e_score_correction_bias": (config.num_local_experts,),
    }
    for e in experts:
        shapes[expert_key(layer, e, "w1")] = (inter, hidden)
        shapes[expert_key(layer, e, "w3")] = (inter, hidden)
        shapes[expert_key(layer, e, "w2")] = (hidden, inter)
    return shapes


def global_shapes(config: MiniMaxM2Config) -> dict[str, tuple[int, ...]]:
    """Expected key -> shape of the tensors outside the decoder layers."""
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, config.hidden_size),
        "model.norm.weight": (config.hidden_size,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def _is_quantizable(key: str) -> bool:
    return key.endswith(".weight") and key.split(".")[-2] in QUANTIZED


def _ignore_reason(key: str, config: MiniMaxM2Config, experts: set[int]) -> str | None:
    """Why `key` is deliberately not read, or None when no rule covers it."""
    if key.startswith(("model.mtp.", "mtp.")):
        return "MTP module"
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return "tied to model.embed_tokens.weight"
    match = _LAYER_KEY.fullmatch(key)
    if not match:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if config.num_hidden_layers <= layer < config.num_hidden_layers + config.num_mtp_modules:
        return "MTP module"
    expert = _EXPERT_KEY.fullmatch(rest)
    if layer < config.num_hidden_layers and expert:
        index = int(expert.group(1))
        if index < config.num_local_experts and index not in experts:
            return "expert not selected"
    return None


def _inside(root: Path, name: object) -> bool:
    """True when the index entry `name` names a file inside `root` (absolute, normalised) once '..' is
    normalised. The file may be a symlink (a Hugging Face cache snapshot links every file into the
    repository's blobs)."""
    if not isinstance(name, str) or Path(name).is_absolute():
        return False
    return Path(os.path.normpath(root / name)).is_relative_to(root)


def needed_keys(keys, config: MiniMaxM2Config, experts: list[int]) -> list[str]:
    """The keys no rule ignores for this expert selection: the tensors a load reads or must validate."""
    chosen = set(experts)
    return [k for k in keys if _ignore_reason(k, config, chosen) is None]


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), checked to be exactly that."""
    index = read_json(index_path, "")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: malformed index: 'weight_map' must map tensor names to file names")
    return weight_map


def _resolve_files(root: Path) -> dict[str, Path]:
    """Map each key named by the index (or the single file) to its shard path, refusing paths outside root."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        single = root / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{root}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        return {"": single}
    weight_map = read_weight_map(index_path)
    files = {}
    normalised = Path(os.path.normpath(root.absolute()))
    for key, name in weight_map.items():
        if not _inside(normalised, name):
            raise CheckpointError(f"{index_path}: {key!r} points to {name!r}, outside the checkpoint directory")
        files[key] = root / name
    return files


class Checkpoint:
    """Validated view of a checkpoint directory for one config and expert selection."""

    def __init__(self, path: str | Path, config: MiniMaxM2Config, experts: list[int]):
        self.root = Path(path)
        self.config = config
        self.experts = experts
        indexed = _resolve_files(self.root)
        needed = needed_keys(indexed, config, experts) if "" not in indexed else [""]
        for key in needed:
            if not indexed[key].is_file():
                raise CheckpointError(f"{self.root / INDEX_FILE}: {key!r} points to missing file {indexed[key].name!r}")
        # shards holding only tensors ignored by rule (other experts, MTP) need not be present
        shards = {p: SafetensorsFile(p) for p in sorted({indexed[k] for k in needed})}
        self._file_of: dict[str, SafetensorsFile] = {}
        for shard in shards.values():
            for key in shard.keys():
                if key in self._file_of:
                    raise CheckpointError(f"{key!r} is stored twice "
                                          f"({self._file_of[key].path.name}, {shard.path.name})")
                if "" not in indexed and indexed.get(key) != shard.path:
                    raise CheckpointError(f"{key!r} is in {shard.path.name} but the index does not list it there")
                self._file_of[key] = shard
        missing_from_files = sorted(k for k in needed if k and k not in self._file_of)
        if missing_from_files:
            raise CheckpointError(f"index lists keys absent from their shard: {missing_from_files[:_MAX_LISTED]}")
        self._validate()

    def _expected(self) -> dict[str, tuple[int, ...]]:
        shapes = global_shapes(self.config)
        for layer in range(self.config.num_hidden_layers):
            shapes.update(layer_shapes(self.config, layer, self.experts))
        return shapes

    def _scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        block = self.config.fp8_block_size
        return tuple(-(-n // b) for n, b in zip(shape, block))

    def _validate(self) -> None:
        expected = self._expected()
        selected = set(self.experts)
        problems = []
        for key, shape in expected.items():
            if key not in self._file_of:
                problems.append(f"missing tensor {key!r}")
                continue
            stored = self._file_of[key].shape(key)
            if stored != shape:
                problems.append(f"tensor {key!r} has shape {list(stored)}, expected {list(shape)}")
            if self._file_of[key].dtype(key).startswith("I"):
                problems.append(f"tensor {key!r} is {self._file_of[key].dtype(key)}: weights must be floating point")
            if self._file_of[key].dtype(key) == "F8_E4M3":
                problems.extend(self._fp8_problems(key, shape))
        for key in self._file_of:
            if key in expected or _ignore_reason(key, self.config, selected):
                continue
            weight = key.removesuffix("_scale_inv")
            if key.endswith("weight_scale_inv") and weight in expected:
                if self._file_of[weight].dtype(weight) != "F8_E4M3":
                    problems.append(f"unexpected tensor {key!r}: {weight!r} is not float8")
                continue
            problems.append(f"unexpected tensor {key!r}")
        if problems:
            listed = "\n  ".join(problems[:_MAX_LISTED])
            more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise CheckpointError(f"{self.root}: checkpoint does not match its config:\n  {listed}{more}")

    def _fp8_problems(self, key: str, shape: tuple[int, ...]) -> list[str]:
        if not _is_quantizable(key):
            return [f"tensor {key!r} is float8 but this module is never quantized"]
        if self.config.fp8_block_size is None:
            return [f"tensor {key!r} is float8 but config.json has no quantization_config"]
        scale = key + "_scale_inv"
        if scale not in self._file_of:
            return [f"missing tensor {scale!r} for float8 weight {key!r}"]
        grid = self._scale_shape(shape)
        if self._file_of[scale].shape(scale) != grid:
            return [f"tensor {scale!r} has shape {list(self._file_of[scale].shape(scale))}, expected {list(grid)}"]
        return []

    def read_fp8(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Tensor `key` as stored when it is float8: its float8_e4m3fn codes (uint8, [out, in]) and its
        weight_scale_inv grid (float32, one per block); None when it is not float8. Codes that are NaN, and
        scales that are not finite and positive, are a CheckpointError naming the tensor."""
        shard = self._file_of[key]
        if shard.dtype(key) != "F8_E4M3":
            return None
        codes = np.array(shard.map(key))
        scale = self._file_of[key + "_scale_inv"].read(key + "_scale_inv")
        nan = int(np.count_nonzero((codes & 127) == 127))
        if nan:
            raise CheckpointError(f"tensor {key!r} in {shard.path.name} holds {nan} NaN values")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise CheckpointError(f"tensor {key!r}_scale_inv holds scales that are not finite and positive")
        return codes, scale

    def read(self, key: str) -> np.ndarray:
        """Tensor `key` as float32; float8 weights dequantised as fp8 * weight_scale_inv of their block.
        A tensor holding NaN or inf is a CheckpointError naming it."""
        shard = self._file_of[key]
        value = shard.read(key)
        if shard.dtype(key) == "F8_E4M3":
            scale = self._file_of[key + "_scale_inv"].read(key + "_scale_inv")
            rows, cols = self.config.fp8_block_size
            per_element = np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)
            value = value * per_element[: value.shape[0], : value.shape[1]]
        if not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise CheckpointError(f"tensor {key!r} in {shard.path.name} holds {bad} NaN or inf values")
        return value
