"""Prepared weights: one safetensors file per rank holding exactly the arrays its device units take.

`prepare` streams a Hugging Face checkpoint layer by layer, reading each tensor once for all ranks and
writing each rank's part (its heads, its experts or expert slices, its vocabulary columns) straight to
that rank's file, in kernel layout ([in, out] matrices, fused gate/up), keyed by the units' argument
names (`embed`, `final_norm`, `lm_head`, `layers.<i>.<name>` for each `LayerWeights` field). Files are
written under a temporary name and renamed when complete, then recorded in `manifest.json` with their
size and sha256; a rerun verifies finished files and writes only the others.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from minimax_m2.checkpoint import Checkpoint, expert_key
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.files import read_json
from minimax_m2.parallel import ParallelLayout
from minimax_m2.safetensors_file import SafetensorsFile
from minimax_m2.safetensors_writer import SafetensorsWriter
from minimax_m2.weights import (
    LAYER_WEIGHT_NAMES,
    LayerWeights,
    ModelWeights,
    cast_weight,
    dense_part,
    expert_part,
    read_dense,
    vocab_columns,
    zero_model_weights,
)

MANIFEST = "manifest.json"
FORMAT = "minimax-m2-prepared/1"


def rank_file(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def _layout_record(layout: ParallelLayout) -> dict[str, Any]:
    return {"world": layout.world, "tp": layout.tp, "moe_tp": layout.moe_tp}


def _config_record(config: MiniMaxM2Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_record(record: dict[str, Any]) -> MiniMaxM2Config:
    block = record.get("fp8_block_size")
    return MiniMaxM2Config(**{**record, "fp8_block_size": tuple(block) if block else None})


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shapes(config: MiniMaxM2Config, experts: list[int], layout: ParallelLayout, dtype: np.dtype) -> dict:
    """key -> (dtype, shape) of one rank's file."""
    template = zero_model_weights(config, experts, layout, dtype)
    shapes = {"embed": template.embed, "final_norm": template.final_norm, "lm_head": template.lm_head}
    entries = {key: (a.dtype, a.shape) for key, a in shapes.items()}
    for i in range(config.num_hidden_layers):
        for name in LAYER_WEIGHT_NAMES:
            a = getattr(template.layers[0], name)
            entries[f"layers.{i}.{name}"] = (a.dtype, a.shape)
    return entries


def _finished(out: Path, manifest: dict | None, name: str) -> bool:
    """True when `name` is in the manifest and the file on disk has its size and sha256."""
    entry = (manifest or {}).get("files", {}).get(name)
    path = out / name
    return bool(entry) and path.is_file() and path.stat().st_size == entry["bytes"] and sha256(path) == entry["sha256"]


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)


def prepare(
    checkpoint: Checkpoint,
    experts: list[int],
    layout: ParallelLayout,
    out: Path,
    dtype: np.dtype,
    source: dict[str, Any],
) -> dict[str, Any]:
    """Write every rank's file of `layout` (its `rank` is ignored) into `out`; returns the manifest.

    `checkpoint` must be opened for all `experts` (every rank's are read). Peak memory: one layer's
    dense tensors plus one expert, whatever the number of ranks.
    """
    config = checkpoint.config
    out.mkdir(parents=True, exist_ok=True)
    old = _manifest(out) if (out / MANIFEST).is_file() else None
    expected = {"format": FORMAT, "config": _config_record(config), "layout": _layout_record(layout),
                "experts": experts, "dtype": np.dtype(dtype).name}
    if old and any(old.get(k) != v for k, v in expected.items()):
        old = None  # another preparation: start again
    manifest = {**expected, "source": source, "files": {}}
    ranks = [ParallelLayout(layout.world, layout.tp, r, moe_tp=layout.moe_tp) for r in range(layout.world)]
    todo = []
    for rank in ranks:
        name = rank_file(rank.rank, rank.world)
        if _finished(out, old, name):
            manifest["files"][name] = old["files"][name]
        else:
            todo.append(rank)
    if todo:
        _write_ranks(checkpoint, experts, todo, out, dtype, manifest)
    _write_manifest(out, manifest)
    manifest["skipped"] = len(ranks) - len(todo)
    return manifest


def _write_ranks(checkpoint: Checkpoint, experts: list[int], ranks: list[ParallelLayout], out: Path, dtype: np.dtype,
                 manifest: dict) -> None:
    config = checkpoint.config
    writers = {}
    for rank in ranks:
        tmp = out / (rank_file(rank.rank, rank.world) + ".tmp")
        writers[rank.rank] = SafetensorsWriter(tmp, _shapes(config, experts, rank, dtype), {"format": FORMAT})
    total = sum(w.data_bytes for w in writers.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="written", position=1) as written:
        def put(rank: ParallelLayout, key: str, value: np.ndarray, index: int | None = None) -> None:
            writers[rank.rank].write(key, value, index)
            written.update(value.nbytes)

        embed = checkpoint.read("model.embed_tokens.weight")
        head = embed if config.tie_word_embeddings else checkpoint.read("lm_head.weight")
        embed_cast = embed.astype(dtype)  # the same for every rank
        final_norm = checkpoint.read("model.norm.weight").astype(dtype)
        for rank in ranks:
            put(rank, "embed", embed_cast)
            put(rank, "final_norm", final_norm)
            put(rank, "lm_head", np.ascontiguousarray(vocab_columns(head, rank)).astype(dtype))
        del embed, embed_cast, head
        held = {r.rank: r.local_experts(experts) for r in ranks}
        holders = {e: [(r, held[r.rank].index(e)) for r in ranks if e in held[r.rank]] for e in experts}
        for layer in tqdm(range(config.num_hidden_layers), desc="layers", unit="layer", position=0):
            hf = read_dense(checkpoint, layer, experts)
            for rank in ranks:
                for name, value in dense_part(config, rank, hf).items():
                    put(rank, f"layers.{layer}.{name}", cast_weight(name, value, dtype))
            del hf
            for e in experts:
                if not holders[e]:
                    continue
                w1, w3, w2 = (checkpoint.read(expert_key(layer, e, n)) for n in ("w1", "w3", "w2"))
                for rank, index in holders[e]:
                    w13_part, w2_part = expert_part(w1, w3, w2, rank.intermediate_slice(config.intermediate_size))
                    put(rank, f"layers.{layer}.w13", w13_part.astype(dtype), index)
                    put(rank, f"layers.{layer}.w2", w2_part.astype(dtype), index)
    for rank in ranks:
        writer = writers[rank.rank]
        writer.close()
        name = rank_file(rank.rank, rank.world)
        os.replace(writer.path, out / name)
        manifest["files"][name] = {"rank": rank.rank, "bytes": writer.nbytes, "sha256": sha256(out / name)}


def _manifest(root: Path) -> dict[str, Any]:
    manifest = read_json(root / MANIFEST, "not a directory written by prepare_weights.py")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{root / MANIFEST}: not a manifest of format {FORMAT!r}")
    return manifest


def prepared_layout(path: str | Path) -> tuple[MiniMaxM2Config, dict[str, int]]:
    """The config and layout ({world, tp, moe_tp}) a directory was prepared for."""
    manifest = _manifest(Path(path))
    return config_from_record(manifest["config"]), manifest["layout"]


def load_prepared(path: str | Path, layout: ParallelLayout) -> tuple[MiniMaxM2Config, list[int], ModelWeights]:
    """This rank's prepared weights, memory-mapped (no transposes, no copies): (config, experts, weights).

    The manifest must name the same layout, and the file must have the manifest's size."""
    root = Path(path)
    manifest = _manifest(root)
    if manifest["layout"] != _layout_record(layout):
        raise ValueError(f"{root} was prepared for layout {manifest['layout']}, but this run is {_layout_record(layout)}")
    name = rank_file(layout.rank, layout.world)
    entry = manifest["files"].get(name)
    file = root / name
    if entry is None or not file.is_file():
        raise FileNotFoundError(f"{file} is missing: rerun prepare_weights.py to finish it")
    if file.stat().st_size != entry["bytes"]:
        raise ValueError(f"{file} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}: rerun prepare_weights.py")
    config = config_from_record(manifest["config"])
    experts = manifest["experts"]
    layout.check(config, len(experts))
    tensors = SafetensorsFile(file)
    expected = _shapes(config, experts, layout, np.dtype(np.float32))
    for key, (_, shape) in expected.items():
        if key not in tensors.keys() or tensors.shape(key) != tuple(shape):
            raise ValueError(f"{file}: tensor {key!r} is missing or not of shape {list(shape)}")
    layers = [LayerWeights(**{n: tensors.map(f"layers.{i}.{n}") for n in LAYER_WEIGHT_NAMES})
              for i in range(config.num_hidden_layers)]
    return config, experts, ModelWeights(tensors.map("embed"), tensors.map("final_norm"), tensors.map("lm_head"), layers)
