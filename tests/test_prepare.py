"""prepare_weights.py: per-rank files in kernel layout that reproduce the checkpoint's logits, loaded
memory-mapped, verified, resumable after kill -9, and refused when they do not match the run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import build_model, relative_error, save, tiny_config
from thread_ranks import ThreadCollectives

from kernels import collectives
from minimax_m2 import MiniMaxM2Model
from minimax_m2.parallel import ParallelLayout
from minimax_m2.prepare import MANIFEST, rank_file

ROOT = Path(__file__).resolve().parents[1]


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_float32_prepared_weights_give_the_checkpoint_logits(sharded_checkpoint, tmp_path) -> None:
    done = prepare(str(sharded_checkpoint), "--out", str(tmp_path / "w"), "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    model = MiniMaxM2Model.from_prepared(tmp_path / "w", max_seq_len=32)
    reference = MiniMaxM2Model.from_pretrained(sharded_checkpoint, max_seq_len=32)
    assert all(not w.flags.owndata for w in (model.weights.embed, model.weights.layers[1].w13)), "weights were copied"
    for got, want in zip(model.weights.layers, reference.weights.layers):
        assert all(np.array_equal(getattr(got, n), getattr(want, n)) for n in vars(want)), "weights differ"
    np.testing.assert_array_equal(model.weights.lm_head, reference.weights.lm_head)
    ids, logits = model.generate(PROMPT, 4, return_logits=True)
    want_ids, want = reference.generate(PROMPT, 4, return_logits=True)
    np.testing.assert_array_equal(ids, want_ids)
    assert relative_error(logits, want) < 1e-6  # same weights; BLAS may order sums differently on other strides


def test_bfloat16_is_two_bytes_a_parameter(float32_checkpoint, tmp_path) -> None:
    assert prepare(str(float32_checkpoint), "--out", str(tmp_path / "w")).returncode == 0
    model = MiniMaxM2Model.from_prepared(tmp_path / "w", max_seq_len=32)
    reference = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    layer = model.weights.layers[0]
    assert layer.wq.dtype.name == "bfloat16" and layer.gate.dtype == np.float32
    router = sum(w.gate.nbytes + w.bias.nbytes for w in model.weights.layers)
    assert model.weights.nbytes() - router == (reference.weights.nbytes() - router) // 2
    assert relative_error(model.forward(PROMPT), reference.forward(PROMPT)) < 2e-2


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 1, 1), (2, 2, 2), (4, 2, 4)])
def test_rank_files_reproduce_one_process(fp8_checkpoint, tmp_path, world, tp, moe_tp) -> None:
    """FP8 checkpoint, every rank loading its own file (ranks as threads)."""
    out = tmp_path / "w"
    done = prepare(str(fp8_checkpoint), "--out", str(out), "--dtype", "float32", "--ep", str(world), "--tp", str(tp),
                   "--moe-tp", str(moe_tp))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["files"]) == [rank_file(r, world) for r in range(world)]
    want_ids, want = MiniMaxM2Model.from_pretrained(fp8_checkpoint, max_seq_len=32).generate(PROMPT, 4, return_logits=True)
    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(lambda r: MiniMaxM2Model.from_prepared(
            out, max_seq_len=32, layout=ParallelLayout(world, tp, r, moe_tp=moe_tp)).generate(PROMPT, 4, return_logits=True))
    finally:
        collectives.set_backend(None)
    for ids, logits in results:
        np.testing.assert_array_equal(ids, want_ids)
        assert relative_error(logits, want) < 1e-5


def test_expert_subset(float32_checkpoint, tmp_path) -> None:
    assert prepare(str(float32_checkpoint), "--out", str(tmp_path / "w"), "--dtype", "float32", "--experts", "0-3,8-11").returncode == 0
    experts = [0, 1, 2, 3, 8, 9, 10, 11]
    got = MiniMaxM2Model.from_prepared(tmp_path / "w", max_seq_len=16).forward(PROMPT)
    want = MiniMaxM2Model.from_pretrained(float32_checkpoint, experts=experts, max_seq_len=16).forward(PROMPT)
    np.testing.assert_array_equal(got, want)


def test_rerun_verifies_and_rewrites_only_what_is_wrong(float32_checkpoint, tmp_path) -> None:
    out = tmp_path / "w"
    args = (str(float32_checkpoint), "--out", str(out), "--ep", "2")
    assert "(0 already complete)" in prepare(*args).stdout
    assert "(2 already complete)" in prepare(*args).stdout
    damaged = out / rank_file(1, 2)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert "(1 already complete)" in prepare(*args).stdout
    assert MiniMaxM2Model.from_prepared(out, layout=ParallelLayout(2, 1, 1), max_seq_len=8)


def test_kill_9_loses_nothing_and_a_rerun_completes(tmp_path_factory, tmp_path) -> None:
    config = tiny_config(hidden_size=256, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=32)
    checkpoint = save(build_model(config, seed=2), tmp_path_factory.mktemp("bigger"))
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert prepare(str(checkpoint), "--out", str(clean), "--ep", "2").returncode == 0
    run = subprocess.Popen([sys.executable, str(ROOT / "prepare_weights.py"), str(checkpoint), "--out", str(killed),
                            "--ep", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not list(killed.glob("*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert not (killed / MANIFEST).exists(), "the run finished before it was killed: the test proves nothing"
    assert not list(killed.glob("rank-*.safetensors")), "a partial rank file was left under its final name"
    done = prepare(str(checkpoint), "--out", str(killed), "--ep", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads((killed / MANIFEST).read_text())["files"] == json.loads((clean / MANIFEST).read_text())["files"]
    assert not list(killed.glob("*.tmp"))


def test_prepared_for_another_layout_is_refused(float32_checkpoint, tmp_path) -> None:
    assert prepare(str(float32_checkpoint), "--out", str(tmp_path / "w"), "--ep", "2").returncode == 0
    with pytest.raises(ValueError, match="prepared for layout"):
        MiniMaxM2Model.from_prepared(tmp_path / "w", layout=ParallelLayout(2, 1, 0, moe_tp=2))
    (tmp_path / "w" / rank_file(1, 2)).write_bytes(b"short")
    with pytest.raises(ValueError, match="the manifest says"):
        MiniMaxM2Model.from_prepared(tmp_path / "w", layout=ParallelLayout(2, 1, 1))


@pytest.mark.parametrize("args, message", [
    (["--experts", "a-b"], "error: --experts takes ids and ranges"),
    (["--ep", "3"], "error: 16 loaded experts cannot be spread evenly over 3 rank groups"),
    (["--experts", "0-2"], "error: 3 experts loaded but each token needs 4"),
])
def test_bad_arguments_are_one_line_errors(float32_checkpoint, tmp_path, args, message) -> None:
    done = prepare(str(float32_checkpoint), "--out", str(tmp_path / "w"), *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [message.split(": ", 1)[0] + ": " + done.stderr.split(": ", 1)[1].strip()]
    assert message in done.stderr


def _shard_by_expert(repo: Path) -> Path:
    """Re-shard a single-file checkpoint as the hub's are: experts 0-7 of each layer in one shard, 8-15 in
    another, everything else in a third."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(repo / "model.safetensors")
    (repo / "model.safetensors").unlink()

    def shard(key: str) -> str:
        if ".experts." not in key:
            return "model-00001-of-00003.safetensors"
        return "model-00002-of-00003.safetensors" if int(key.split(".experts.")[1].split(".")[0]) < 8 \
            else "model-00003-of-00003.safetensors"

    weight_map = {key: shard(key) for key in tensors}
    for name in set(weight_map.values()):
        save_file({k: v for k, v in tensors.items() if weight_map[k] == name}, repo / name, metadata={"format": "pt"})
    (repo / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return repo


def test_repo_id_downloads_only_the_shards_needed(tmp_path_factory, tmp_path) -> None:
    """A hub served on 127.0.0.1 (HF_ENDPOINT): config, index and tokenizer files first, then only the
    shards holding the selected experts' tensors; an expert subset skips shards of other experts only."""
    from hub_server import HubServer

    repo = _shard_by_expert(save(build_model(tiny_config(), seed=4), tmp_path_factory.mktemp("repo")))
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="30")
    with HubServer("acme/tiny-m2", repo) as hub:
        env["HF_ENDPOINT"] = hub.url
        done = subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), "--repo-id", "acme/tiny-m2",
                               "--experts", "0-3", "--out", str(tmp_path / "w"), "--dtype", "float32"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        downloaded = set(hub.downloaded)
    shards = {name for key, name in weight_map.items() if ".experts." not in key or
              int(key.split(".experts.")[1].split(".")[0]) < 4}
    other_experts_only = set(weight_map.values()) - shards
    assert other_experts_only, "the test needs shards that hold only other experts"
    assert {"config.json", "model.safetensors.index.json"} <= downloaded
    assert downloaded & set(weight_map.values()) == shards
    assert f"downloading {len(shards)} of {len(set(weight_map.values()))} shard files" in done.stdout
    manifest = json.loads((tmp_path / "w" / MANIFEST).read_text())
    assert manifest["source"] == {"repo_id": "acme/tiny-m2", "revision": "0123456789abcdef0123456789abcdef01234567"}
    got = MiniMaxM2Model.from_prepared(tmp_path / "w", max_seq_len=16).forward(PROMPT)
    want = MiniMaxM2Model.from_pretrained(repo, experts=[0, 1, 2, 3], max_seq_len=16).forward(PROMPT)
    np.testing.assert_array_equal(got, want)
