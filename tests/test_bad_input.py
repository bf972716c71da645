"""Bad checkpoints and bad inputs give errors that name the problem, and lose nothing."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROMPT
from safetensors.torch import load_file, save_file

from minimax_m2 import CheckpointError, MiniMaxM2Model

O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def _rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a single-file checkpoint, passing its tensors through `change(dict)`."""
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(float32_checkpoint, tmp_path) -> None:
    path = _rewrite(float32_checkpoint, tmp_path / "c", lambda t: t.pop(O_PROJ))
    with pytest.raises(CheckpointError, match=f"missing tensor '{O_PROJ}'"):
        MiniMaxM2Model.from_pretrained(path)


def test_unexpected_tensor_is_named(float32_checkpoint, tmp_path) -> None:
    extra = "model.layers.0.self_attn.rotary.weight"
    path = _rewrite(float32_checkpoint, tmp_path / "c", lambda t: t.update({extra: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}'"):
        MiniMaxM2Model.from_pretrained(path)


def test_expert_beyond_config_is_unexpected(float32_checkpoint, tmp_path) -> None:
    extra = "model.layers.0.block_sparse_moe.experts.16.w1.weight"
    path = _rewrite(float32_checkpoint, tmp_path / "c", lambda t: t.update({extra: torch.zeros(48, 64)}))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}'"):
        MiniMaxM2Model.from_pretrained(path)


def test_wrong_shape_is_named(float32_checkpoint, tmp_path) -> None:
    path = _rewrite(float32_checkpoint, tmp_path / "c", lambda t: t.update({O_PROJ: t[O_PROJ][:, :32].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"'{O_PROJ}' has shape \[64, 32\], expected \[64, 64\]"):
        MiniMaxM2Model.from_pretrained(path)


def test_mtp_modules_are_ignored_by_rule(float32_checkpoint, tmp_path) -> None:
    """Keys of MTP modules (layers past num_hidden_layers when use_mtp) are accounted for, not errors."""
    key = "model.layers.2.self_attn.q_proj.weight"
    path = _rewrite(float32_checkpoint, tmp_path / "c", lambda t: t.update({key: torch.zeros(64, 64)}))
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.2.self_attn.q_proj.weight'"):
        MiniMaxM2Model.from_pretrained(path)
    config.update(use_mtp=True, num_mtp_modules=1)
    (path / "config.json").write_text(json.dumps(config))
    MiniMaxM2Model.from_pretrained(path)


def test_truncated_shard(sharded_checkpoint, tmp_path) -> None:
    path = shutil.copytree(sharded_checkpoint, tmp_path / "c")
    shard = sorted(path.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard.name}: truncated"):
        MiniMaxM2Model.from_pretrained(path)


def test_malformed_header(float32_checkpoint, tmp_path) -> None:
    path = shutil.copytree(float32_checkpoint, tmp_path / "c")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"not json!!!!"
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="malformed safetensors header"):
        MiniMaxM2Model.from_pretrained(path)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd"])
def test_index_pointing_outside_checkpoint(sharded_checkpoint, tmp_path, target) -> None:
    path = shutil.copytree(sharded_checkpoint, tmp_path / "c")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][O_PROJ] = target
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        MiniMaxM2Model.from_pretrained(path)


def test_fp8_weight_without_scale(fp8_checkpoint, tmp_path) -> None:
    path = shutil.copytree(fp8_checkpoint, tmp_path / "c")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    scale = O_PROJ + "_scale_inv"
    shard = path / index["weight_map"].pop(scale)
    tensors = load_file(shard)
    tensors.pop(scale)
    save_file(tensors, shard)
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing tensor '{scale}'"):
        MiniMaxM2Model.from_pretrained(path)


def test_out_of_vocab_id_loses_nothing(float32_checkpoint) -> None:
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=16)
    first = model.forward(PROMPT[:, :3])
    with pytest.raises(ValueError, match=r"token ids \[256\] are outside the vocabulary 0..255"):
        model.forward(np.array([[1], [256]]))
    with pytest.raises(ValueError, match=r"token ids \[-1\]"):
        model.forward(np.array([[-1], [2]]))
    assert model.position == 3
    rest = model.forward(PROMPT[:, 3:])
    model.reset()
    whole = model.forward(PROMPT)
    assert np.max(np.abs(np.concatenate([first, rest], axis=1) - whole)) < 1e-5 * np.max(np.abs(whole))


def test_prompt_longer_than_cache(float32_checkpoint) -> None:
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=8)
    with pytest.raises(ValueError, match="exceed max_seq_len 8"):
        model.forward(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model.generate(PROMPT, max_new_tokens=3)
    assert model.position == 0


def test_missing_checkpoint_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        MiniMaxM2Model.from_pretrained(tmp_path)


def test_hub_cache_snapshot_with_symlinked_shards_loads(sharded_checkpoint, tmp_path) -> None:
    """The layout `hf download` / snapshot_download writes without --local-dir: every file in
    snapshots/<revision>/ is a symlink into ../../blobs."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(sharded_checkpoint.iterdir())):
        (blobs / f"blob{i}").write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / f"blob{i}")
    want = MiniMaxM2Model.from_pretrained(sharded_checkpoint, max_seq_len=8).forward(PROMPT[:, :3])
    got = MiniMaxM2Model.from_pretrained(snapshot, max_seq_len=8).forward(PROMPT[:, :3])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(float32_checkpoint, tmp_path, bad) -> None:
    q_proj = "model.layers.1.self_attn.q_proj.weight"

    def poison(t):
        t[q_proj][3, 5] = bad

    path = _rewrite(float32_checkpoint, tmp_path / "c", poison)
    with pytest.raises(CheckpointError, match=f"tensor '{q_proj}' in model.safetensors holds 1 NaN or inf values"):
        MiniMaxM2Model.from_pretrained(path)


def test_integer_weight_is_refused(float32_checkpoint, tmp_path) -> None:
    path = _rewrite(float32_checkpoint, tmp_path / "c", lambda t: t.update({O_PROJ: t[O_PROJ].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=f"tensor '{O_PROJ}' is I32: weights must be floating point"):
        MiniMaxM2Model.from_pretrained(path)


# --- values checked by type and range before use (each case once gave a traceback or a silent wrong answer) ----

def _header_rewrite(path: Path, change) -> None:
    """Rewrite a safetensors file's JSON header through `change(dict)`, keeping the data section."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])


def _first_two(header: dict) -> tuple[str, str]:
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return keys[0], keys[1]


def _alias(header: dict) -> None:
    """The second tensor points at the first one's bytes (same size); its own bytes belong to nobody."""
    a, b = _first_two(header)
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]


@pytest.mark.parametrize("change, message", [
    (_alias, "overlap"),
    (lambda h: h[_first_two(h)[0]].update(data_offsets=["0", "4"]), "malformed header entry"),
    (lambda h: h[_first_two(h)[0]].update(shape=[1.5, 2.0]), "malformed header entry"),
    (lambda h: h.update(__metadata__=["x"]), "__metadata__ must map names to strings"),
])
def test_malformed_header_fields_are_named(float32_checkpoint, tmp_path, change, message) -> None:
    path = shutil.copytree(float32_checkpoint, tmp_path / "c")
    _header_rewrite(path / "model.safetensors", change)
    with pytest.raises(ValueError, match=message):
        MiniMaxM2Model.from_pretrained(path)


def test_index_weight_map_as_a_list(sharded_checkpoint, tmp_path) -> None:
    path = shutil.copytree(sharded_checkpoint, tmp_path / "c")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="'weight_map' must map tensor names to file names"):
        MiniMaxM2Model.from_pretrained(path)


@pytest.mark.parametrize("key, value, message", [
    ("tie_word_embeddings", "false", "'tie_word_embeddings' is 'false', expected true or false"),
    ("rms_norm_eps", -1e6, "'rms_norm_eps' is -1000000.0, expected a finite number in (0, 1]"),
    ("rope_theta", -10000, "'rope_theta' is -10000"),
    ("num_hidden_layers", 1e8, "'num_hidden_layers' is 100000000.0, expected an integer"),
    ("num_local_experts", 1000000000, "'num_local_experts' is 1000000000, expected an integer in [1, 65536]"),
    ("quantization_config", "fp8", "'quantization_config' is 'fp8', expected a JSON object"),
    ("rope_parameters", [1, 2], "'rope_parameters' is [1, 2], expected a JSON object"),
])
def test_config_values_are_checked(float32_checkpoint, tmp_path, key, value, message) -> None:
    path = shutil.copytree(float32_checkpoint, tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as raised:
        MiniMaxM2Model.from_pretrained(path)
    assert message in str(raised.value) and "config.json" in str(raised.value)


@pytest.mark.parametrize("key, value, message", [
    ("eos_token_id", "98", "'eos_token_id' is '98', expected an integer"),
    ("temperature", "0.7", "'temperature' is '0.7', expected a number"),
    ("do_sample", "yes", "'do_sample' is 'yes', expected true or false"),
])
def test_generation_config_values_are_checked(tmp_path, key, value, message) -> None:
    from minimax_m2.generation import checkpoint_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps({key: value}))
    with pytest.raises(ValueError, match=message):
        checkpoint_defaults(tmp_path)


@pytest.mark.parametrize("file, text, message", [
    ("config.json", '{"a": ' * 5000 + "{}" + "}" * 5000, "nested 5001 levels deep"),
    ("config.json", '{"model_type": "minimax_m2\\ud800"}', "model_type holds a lone surrogate"),
    ("generation_config.json", "[" * 100000 + "]" * 100000, "nested 100000 levels deep"),
])
def test_json_files_are_read_within_bounds(float32_checkpoint, tmp_path, file, text, message) -> None:
    """A checkpoint's JSON nested too deep or holding a lone surrogate is one error naming the file, never a
    RecursionError."""
    path = tmp_path / "c"
    shutil.copytree(float32_checkpoint, path)
    (path / file).write_text(text)
    from minimax_m2.generation import checkpoint_defaults

    with pytest.raises(ValueError, match=f"{file}: .*{message}"):
        checkpoint_defaults(path) if file == "generation_config.json" else MiniMaxM2Model.from_pretrained(path)


def test_a_safetensors_header_nested_too_deep_is_refused(tmp_path) -> None:
    from minimax_m2.weights.safetensors_file import SafetensorsFile

    header = ('{"a": ' * 3000 + "{}" + "}" * 3000).encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="malformed safetensors header: nested 3001 levels deep"):
        SafetensorsFile(tmp_path / "x.safetensors")
