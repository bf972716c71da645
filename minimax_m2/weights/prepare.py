"""Prepared weights: one safetensors file per rank holding exactly the arrays its device units take.

`prepare` streams a Hugging Face checkpoint layer by layer, reading each tensor once for all ranks and
writing each rank's part (its heads, its experts or expert slices, its vocabulary columns) straight to
that rank's file, in kernel layout (see `minimax_m2.weights.model_weights`), keyed by the units' argument
names (`embed`, `final_norm`, `lm_head`, `layers.<i>.<name>` for each `LayerWeights` field). Every array
is checked finite after its cast. Files are written under a temporary name and renamed when complete;
`manifest.json` records the config, layout, dtype, experts and, per file, its size and the CRC32 of
every tensor. Each file's header also names its rank, layout and config. The source's tokenizer,
generation and chat-template files are copied beside them, so a prepared directory runs on its own.
A rerun verifies finished files and writes only the others; a lock refuses a second run writing into
the same directory, and a failed run removes its temporary files.

Loading (`load_prepared`) checks that the file is this rank's of this layout, that the manifest's config
is the one the file was prepared from, every tensor's name, dtype and shape, and (unless told not to)
every tensor's CRC32 against the manifest: the checksum guarantees the bytes prepared, which were
checked finite.
"""

import fcntl
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from minimax_m2 import checks
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.checkpoint import Checkpoint, expert_key
from minimax_m2.weights.files import read_json
from minimax_m2.weights.model_weights import (
    LAYER_WEIGHT_NAMES,
    LayerWeights,
    ModelWeights,
    cast_weight,
    dense_part,
    embed_rows,
    expert_part,
    fp8_expert_part,
    model_dtype,
    read_dense,
    read_fp8_expert,
    vocab_columns,
    zero_model_weights,
)
from minimax_m2.weights.safetensors_file import SafetensorsFile
from minimax_m2.weights.safetensors_writer import SafetensorsWriter

MANIFEST = "manifest.json"
LOCK = ".prepare.lock"
FORMAT = "minimax-m2-prepared/2"
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja")


def rank_file(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def _layout_record(layout: ParallelLayout) -> dict[str, int]:
    return {"world": layout.world, "tp": layout.tp, "moe_tp": layout.moe_tp}


def _shapes(config: MiniMaxM2Config, experts: list[int], layout: ParallelLayout, dtype: np.dtype,
            fp8: bool) -> dict:
    """key -> (dtype, shape) of one rank's file (FP8 experts as codes and scales with `fp8`)."""
    template = zero_model_weights(config, experts, layout, dtype, fp8=fp8)
    shapes = {"embed": template.embed, "final_norm": template.final_norm, "lm_head": template.lm_head}
    entries = {key: (a.dtype, a.shape) for key, a in shapes.items()}
    for i in range(config.num_hidden_layers):
        for name in LAYER_WEIGHT_NAMES:
            a = getattr(template.layers[0], name)
            if a is not None:
                entries[f"layers.{i}.{name}"] = (a.dtype, a.shape)
    return entries


def tensor_checksums(file: SafetensorsFile) -> dict[str, int]:
    """CRC32 of every tensor's bytes, computed over the memory-mapped file on a few threads."""
    def crc(key: str) -> int:
        return zlib.crc32(file.map(key).reshape(-1).view(np.uint8))

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(file.keys(), pool.map(crc, file.keys())))


def _file_metadata(layout: ParallelLayout, config: MiniMaxM2Config) -> dict[str, str]:
    """What each rank file's header says it is."""
    return {"format": FORMAT, "rank": str(layout.rank), "layout": json.dumps(_layout_record(layout)),
            "config": json.dumps(config.record(), sort_keys=True)}


def _finished(out: Path, manifest: dict | None, name: str) -> bool:
    """True when `name` is in the manifest and the file on disk has its size and checksums."""
    entry = (manifest or {}).get("files", {}).get(name)
    path = out / name
    if not entry or not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    try:
        return tensor_checksums(SafetensorsFile(path)) == entry["tensors"]
    except ValueError:
        return False


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `out`'s lock for the whole preparation; a second preparation into `out` is refused."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ValueError(f"{out} is being written by another prepare_weights.py (pid {holder}): wait for it to "
                             "finish or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare(
    checkpoint: Checkpoint,
    experts: list[int],
    layout: ParallelLayout,
    out: Path,
    dtype: np.dtype,
    source: dict[str, Any],
    keep_fp8: bool = False,
) -> dict[str, Any]:
    """Write every rank's file of `layout` (its `rank` is ignored) and the carried files into `out`;
    returns the manifest (with 'skipped': files already complete). keep_fp8: an FP8 checkpoint's experts
    are written as their codes and block scales (`fp8_expert_part`), not dequantised.

    `checkpoint` must be opened for all `experts` (every rank's are read). Peak memory: one layer's
    dense tensors plus one expert, whatever the number of ranks.
    """
    config = checkpoint.config
    with _locked(out):
        for stale in out.glob("*.tmp"):
            stale.unlink()
        old = _read_manifest(out) if (out / MANIFEST).is_file() else None
        expected = {"format": FORMAT, "config": config.record(), "layout": _layout_record(layout),
                    "experts": experts, "dtype": np.dtype(dtype).name, "fp8": keep_fp8, "source": source,
                    "source_files": source_files(checkpoint.root)}
        if old and any(old.get(k) != v for k, v in expected.items()):
            for name in old.get("files", {}):  # another preparation, or the source changed: start again
                (out / name).unlink(missing_ok=True)
            old = None
        manifest = {**expected, "files": {}, "carried": _carry(checkpoint.root, out)}
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
        _write_json(out / MANIFEST, manifest)
    manifest["skipped"] = len(ranks) - len(todo)
    return manifest


def source_files(root: Path) -> dict[str, list[int]]:
    """The identity of a checkpoint's tensor files: each one's [bytes, modification time in ns]. A finished
    rank file is kept only when the source it came from still has this identity (new tensor values in a
    file of the same size are a new modification time)."""
    return {file.name: [file.stat().st_size, file.stat().st_mtime_ns] for file in sorted(root.glob("*.safetensors"))}


def _carry(root: Path, out: Path) -> list[str]:
    """Copy the source's tokenizer, generation and chat-template files into `out`; their names."""
    carried = []
    for name in CARRIED_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, out / name)
            carried.append(name)
    return carried


def _write_ranks(checkpoint: Checkpoint, experts: list[int], ranks: list[ParallelLayout], out: Path, dtype: np.dtype,
                 manifest: dict) -> None:
    """Write `ranks`' files under temporary names, then rename each; on any failure remove them all."""
    config = checkpoint.config
    writers: dict[int, SafetensorsWriter] = {}
    try:
        for rank in ranks:
            tmp = out / (rank_file(rank.rank, rank.world) + ".tmp")
            writers[rank.rank] = SafetensorsWriter(tmp, _shapes(config, experts, rank, dtype, manifest["fp8"]),
                                                   _file_metadata(rank, config))
        _fill(checkpoint, experts, ranks, writers, dtype, manifest["fp8"])
        for rank in ranks:
            writers[rank.rank].close()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    for rank in ranks:
        writer, name = writers[rank.rank], rank_file(rank.rank, rank.world)
        os.replace(writer.path, out / name)
        manifest["files"][name] = {"rank": rank.rank, "bytes": writer.nbytes,
                                   "tensors": tensor_checksums(SafetensorsFile(out / name))}


def _finite(key: str, value: np.ndarray) -> np.ndarray:
    """value, refused when its cast left NaN or inf (a float32 beyond bfloat16's range rounds to inf)."""
    if not np.isfinite(value.astype(np.float32, copy=False)).all():
        raise ValueError(f"{key}: NaN or inf after casting to {value.dtype}")
    return value


def _fill(checkpoint: Checkpoint, experts: list[int], ranks: list[ParallelLayout],
          writers: dict[int, SafetensorsWriter], dtype: np.dtype, keep_fp8: bool) -> None:
    config = checkpoint.config
    total = sum(w.data_bytes for w in writers.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="written", position=1) as written:
        def put(rank: ParallelLayout, key: str, value: np.ndarray, index: int | None = None) -> None:
            writers[rank.rank].write(key, value, index)
            written.update(value.nbytes)

        embed = checkpoint.read("model.embed_tokens.weight")
        head = embed if config.tie_word_embeddings else checkpoint.read("lm_head.weight")
        embed_cast = _finite("embed", embed.astype(dtype))  # each rank keeps its rows
        final_norm = _finite("final_norm", checkpoint.read("model.norm.weight").astype(dtype))
        for rank in ranks:
            put(rank, "embed", np.ascontiguousarray(embed_rows(embed_cast, rank)))
            put(rank, "final_norm", final_norm)
            put(rank, "lm_head", _finite("lm_head", np.ascontiguousarray(vocab_columns(head, rank)).astype(dtype)))
        del embed, embed_cast, head
        held = {r.rank: r.local_experts(experts) for r in ranks}
        holders = {e: [(r, held[r.rank].index(e)) for r in ranks if e in held[r.rank]] for e in experts}
        for layer in tqdm(range(config.num_hidden_layers), desc="layers", unit="layer", position=0):
            hf = read_dense(checkpoint, layer, experts)
            for rank in ranks:
                for name, value in dense_part(config, rank, hf).items():
                    key = f"layers.{layer}.{name}"
                    put(rank, key, _finite(key, cast_weight(name, value, dtype)))
            del hf
            for e in experts:
                if not holders[e]:
                    continue
                if keep_fp8:  # each expert read once, every rank's part sliced from it
                    stored = read_fp8_expert(checkpoint, layer, e)
                    if stored is None:
                        raise ValueError(f"layer {layer} expert {e} is not stored as float8: --fp8 keep needs "
                                         "every expert in FP8")
                    for rank, index in holders[e]:
                        part = fp8_expert_part(stored, config.fp8_block_size,
                                               rank.intermediate_slice(config.intermediate_size))
                        for name, value in part.items():
                            put(rank, f"layers.{layer}.{name}", value, index)
                    continue
                w1, w3, w2 = (checkpoint.read(expert_key(layer, e, n)) for n in ("w1", "w3", "w2"))
                for rank, index in holders[e]:
                    w13_part, w2_part = expert_part(w1, w3, w2, rank.intermediate_slice(config.intermediate_size))
                    put(rank, f"layers.{layer}.w13", _finite(f"layers.{layer}.w13", w13_part.astype(dtype)), index)
                    put(rank, f"layers.{layer}.w2", _finite(f"layers.{layer}.w2", w2_part.astype(dtype)), index)


def _read_manifest(root: Path) -> dict[str, Any]:
    """manifest.json, checked by structure: format, config, layout, experts, dtype and files."""
    where = root / MANIFEST
    manifest = checks.mapping(str(where), read_json(where, "not a directory written by prepare_weights.py"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: not a manifest of format {FORMAT!r} (got {manifest.get('format')!r}): rerun "
                         "prepare_weights.py")
    for key in ("config", "layout", "files"):
        checks.mapping(f"{where}: {key!r}", manifest.get(key))
    layout = manifest["layout"]
    for key in ("world", "tp", "moe_tp"):
        checks.integer(f"{where}: 'layout.{key}'", layout.get(key))
    if not isinstance(manifest.get("experts"), list):
        raise ValueError(f"{where}: 'experts' is {manifest.get('experts')!r}, expected a list of expert ids")
    checks.integers(f"{where}: 'experts'", manifest["experts"])
    model_dtype(checks.text(f"{where}: 'dtype'", manifest.get("dtype")))
    if not isinstance(manifest.setdefault("fp8", False), bool):  # written before FP8 experts could be kept: False
        raise ValueError(f"{where}: 'fp8' is {manifest['fp8']!r}, expected true or false")
    for name, entry in manifest["files"].items():
        entry = checks.mapping(f"{where}: files[{name!r}]", entry)
        checks.integer(f"{where}: files[{name!r}].bytes", entry.get("bytes"), 1, 1 << 50)
        checks.mapping(f"{where}: files[{name!r}].tensors", entry.get("tensors"))
    return manifest


def prepared_layout(path: str | Path) -> tuple[MiniMaxM2Config, dict[str, int], list[int]]:
    """The config, layout ({world, tp, moe_tp}) and experts a directory was prepared for."""
    root = Path(path)
    manifest = _read_manifest(root)
    return (MiniMaxM2Config.from_record(manifest["config"], f"{root / MANIFEST}: 'config'"), manifest["layout"],
            manifest["experts"])


def prepared_fp8(path: str | Path) -> bool:
    """Whether a directory's experts were prepared as FP8 codes (prepare_weights.py --fp8 keep)."""
    return _read_manifest(Path(path))["fp8"]


def load_prepared(path: str | Path, layout: ParallelLayout,
                  verify: bool = True) -> tuple[MiniMaxM2Config, list[int], ModelWeights]:
    """This rank's prepared weights, memory-mapped (no transposes, no copies): (config, experts, weights).

    Checked: the manifest names this layout; the file has the manifest's size; its header names this
    rank, this layout and the manifest's config; every tensor has its name, dtype and shape; and, with
    `verify`, every tensor's CRC32 equals the manifest's (one read of the file)."""
    root = Path(path)
    manifest = _read_manifest(root)
    config = MiniMaxM2Config.from_record(manifest["config"], f"{root / MANIFEST}: 'config'")
    if manifest["layout"] != _layout_record(layout):
        raise ValueError(f"{root} was prepared for layout {manifest['layout']}, but this run is "
                         f"{_layout_record(layout)}")
    name = rank_file(layout.rank, layout.world)
    entry = manifest["files"].get(name)
    file = root / name
    if entry is None or not file.is_file():
        raise FileNotFoundError(f"{file} is missing: rerun prepare_weights.py to finish it")
    if file.stat().st_size != entry["bytes"]:
        raise ValueError(f"{file} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                         "rerun prepare_weights.py")
    experts = manifest["experts"]
    layout.check(config, len(experts))
    tensors = SafetensorsFile(file)
    stamped = {k: tensors.metadata.get(k) for k in ("rank", "layout")}
    if stamped != {"rank": str(layout.rank), "layout": json.dumps(_layout_record(layout))}:
        raise ValueError(f"{file} holds the weights of rank {stamped['rank']} of layout {stamped['layout']}, not rank "
                         f"{layout.rank} of {_layout_record(layout)}: files were renamed or swapped")
    prepared_from = tensors.metadata.get("config")
    if prepared_from != json.dumps(config.record(), sort_keys=True):
        changed = _changed_fields(json.loads(prepared_from or "{}"), config.record())
        raise ValueError(f"{root / MANIFEST}: its config differs from the one {name} was prepared with ({changed})")
    dtype = model_dtype(manifest["dtype"])
    for key, (want, shape) in _shapes(config, experts, layout, dtype, manifest["fp8"]).items():
        if key not in tensors.keys() or tensors.shape(key) != tuple(shape) or tensors.map(key).dtype != want:
            raise ValueError(f"{file}: tensor {key!r} is missing or not {want.name} of shape {list(shape)}")
    if verify:
        _verify(file, tensors, entry["tensors"])
    layers = [LayerWeights(**{n: tensors.map(f"layers.{i}.{n}") for n in LAYER_WEIGHT_NAMES
                              if f"layers.{i}.{n}" in tensors.keys()})
              for i in range(config.num_hidden_layers)]
    return config, experts, ModelWeights(tensors.map("embed"), tensors.map("final_norm"), tensors.map("lm_head"),
                                         layers)


def _changed_fields(before: dict, after: dict) -> str:
    changed = [f"{k}: {before.get(k)!r} prepared, {after.get(k)!r} now" for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k)]
    return "; ".join(changed) or "unreadable"


def _verify(file: Path, tensors: SafetensorsFile, expected: dict[str, int]) -> None:
    """Every tensor's CRC32 against the manifest; names the first tensor that differs."""
    found = tensor_checksums(tensors)
    bad = [key for key in tensors.keys() if found[key] != expected.get(key)]
    if bad:
        raise ValueError(f"{file}: tensor {bad[0]!r}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} differ from "
                         "what was prepared (checksum mismatch): the file is damaged; rerun prepare_weights.py")
