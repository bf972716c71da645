"""prepare_weights.py: per-rank files in kernel layout that reproduce the checkpoint's logits, loaded
memory-mapped, verified, resumable after kill -9, and refused when they do not match the run."""

import json
import os
import shutil
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
from minimax_m2.weights.prepare import MANIFEST, rank_file

ROOT = Path(__file__).resolve().parents[1]


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def assert_same_model(prepared: MiniMaxM2Model, loaded: MiniMaxM2Model) -> None:
    """Every weight of the prepared files equals the checkpoint's, and the logits agree to float32 rounding
    (a checkpoint loaded on this CPU holds its projections as [out, in] rows, which its BLAS multiplies in
    another order than the prepared [in, out] ones)."""
    for name in ("embed", "final_norm", "lm_head"):
        np.testing.assert_array_equal(getattr(prepared.weights, name), getattr(loaded.weights, name))
    for mine, theirs in zip(prepared.weights.layers, loaded.weights.layers, strict=True):
        for field, value in vars(mine).items():
            np.testing.assert_array_equal(value, getattr(theirs, field), err_msg=field)
    assert relative_error(prepared.forward(PROMPT), loaded.forward(PROMPT)) < 1e-6


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
    model = MiniMaxM2Model.from_pretrained(fp8_checkpoint, max_seq_len=32)
    want_ids, want = model.generate(PROMPT, 4, return_logits=True)
    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(lambda r: MiniMaxM2Model.from_prepared(
            out, max_seq_len=32, layout=ParallelLayout(world, tp, r, moe_tp=moe_tp),
        ).generate(PROMPT, 4, return_logits=True))
    finally:
        collectives.set_backend(None)
    for ids, logits in results:
        np.testing.assert_array_equal(ids, want_ids)
        assert relative_error(logits, want) < 1e-5


def test_expert_subset(float32_checkpoint, tmp_path) -> None:
    assert prepare(str(float32_checkpoint), "--out", str(tmp_path / "w"), "--dtype", "float32", "--experts",
                   "0-3,8-11").returncode == 0
    experts = [0, 1, 2, 3, 8, 9, 10, 11]
    assert_same_model(MiniMaxM2Model.from_prepared(tmp_path / "w", max_seq_len=16),
                      MiniMaxM2Model.from_pretrained(float32_checkpoint, experts=experts, max_seq_len=16))


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
    first = message.split(": ", 1)[0] + ": " + done.stderr.split(": ", 1)[1].strip()
    assert done.stderr.strip().splitlines() == [first]
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
    assert_same_model(MiniMaxM2Model.from_prepared(tmp_path / "w", max_seq_len=16),
                      MiniMaxM2Model.from_pretrained(repo, experts=[0, 1, 2, 3], max_seq_len=16))


# --- prepared weights are checked when loaded, and carry what a run needs -----------------------------------

def _prepared(checkpoint: Path, out: Path, *args: str) -> Path:
    done = prepare(str(checkpoint), "--out", str(out), "--dtype", "float32", *args)
    assert done.returncode == 0, done.stderr
    return out


def _tensor_bytes(path: Path, key: str) -> tuple[int, int]:
    """(first, last + 1) file offsets of a tensor's bytes."""
    from minimax_m2.weights.safetensors_file import SafetensorsFile

    file = SafetensorsFile(path)
    _, _, begin, end = file._entries[key]
    return file._data_start + begin, file._data_start + end


def _poison_with_nan(path: Path) -> None:
    first, _ = _tensor_bytes(path, "layers.1.wq")
    data = bytearray(path.read_bytes())
    data[first : first + 16] = np.full(4, np.nan, np.float32).tobytes()
    path.write_bytes(bytes(data))


def _flip_a_byte(path: Path) -> None:
    first, last = _tensor_bytes(path, "layers.0.w13")
    data = bytearray(path.read_bytes())
    data[(first + last) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_poison_with_nan, _flip_a_byte], ids=["nan-written", "flipped-byte"])
def test_a_damaged_file_of_the_same_size_is_refused(float32_checkpoint, tmp_path, damage) -> None:
    out = _prepared(float32_checkpoint, tmp_path / "w")
    damage(out / rank_file(0, 1))
    with pytest.raises(ValueError, match="differ from what was prepared"):
        MiniMaxM2Model.from_prepared(out, max_seq_len=8)
    MiniMaxM2Model.from_prepared(out, max_seq_len=8, verify=False)  # the structure itself is intact


def test_swapped_rank_files_are_refused(float32_checkpoint, tmp_path) -> None:
    out = _prepared(float32_checkpoint, tmp_path / "w", "--ep", "2", "--moe-tp", "2")
    first, second = out / rank_file(0, 2), out / rank_file(1, 2)
    first.rename(tmp_path / "x")
    second.rename(first)
    (tmp_path / "x").rename(second)
    with pytest.raises(ValueError, match="holds the weights of rank 1 .* not rank 0"):
        MiniMaxM2Model.from_prepared(out, max_seq_len=8, layout=ParallelLayout(2, 1, 0, moe_tp=2))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["config"].update(rope_theta=1e4), "its config differs from the one .* was prepared with "
                                                   r"\(rope_theta: 5000000.0 prepared, 10000.0 now\)"),
    (lambda m: m.pop("config"), r"'config' is None, expected a JSON object"),
    (lambda m: m["config"].update(sliding_window=4), r"config fields unknown: \['sliding_window'\]"),
    (lambda m: m.update(layout=[1, 1, 1]), "'layout' is .*, expected a JSON object"),
    (lambda m: m["config"].update(rms_norm_eps=-1), "'rms_norm_eps' is -1, expected a finite number"),
])
def test_an_edited_manifest_is_refused(float32_checkpoint, tmp_path, change, message) -> None:
    out = _prepared(float32_checkpoint, tmp_path / "w")
    manifest = json.loads((out / MANIFEST).read_text())
    change(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        MiniMaxM2Model.from_prepared(out, max_seq_len=8)


def test_a_prepared_directory_runs_on_its_own(with_tokenizer, tmp_path) -> None:
    """Tokenizer, generation_config.json (EOS) and chat template travel with the weights: --prompt, --chat and
    the EOS stop give the checkpoint's tokens, with nothing of the checkpoint left."""
    source = tmp_path / "source"
    shutil.copytree(with_tokenizer, source)
    reference = MiniMaxM2Model.from_pretrained(source, max_seq_len=64)
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(source / "tokenizer.json")).encode("hello there", add_special_tokens=False).ids
    eos = int(reference.generate(np.array([prompt]), 4)[0, len(prompt) + 2])
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    (source / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    out = _prepared(source, tmp_path / "w")
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}

    def generate(*args: str) -> dict:
        ids = tmp_path / "ids.json"
        done = subprocess.run([sys.executable, str(ROOT / "run_example.py"), "--mode", "generate", *args,
                               "--max-new-tokens", "6", "--max-seq-len", "64", "--output-json", str(ids)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return json.loads(ids.read_text())

    from_checkpoint = generate("--checkpoint", str(source), "--prompt", "hello there")
    shutil.rmtree(source)
    from_prepared = generate("--weights", str(out), "--prompt", "hello there")
    assert from_prepared == from_checkpoint
    assert from_prepared["generated_ids"][0][-1] == eos and len(from_prepared["generated_ids"][0]) == 3
    chat = generate("--weights", str(out), "--chat", "hi")
    assert Tokenizer.from_file(str(out / "tokenizer.json")).decode(chat["prompt_ids"][0]) == "<user>hi"


def test_a_second_preparation_into_the_same_directory_is_refused(float32_checkpoint, tmp_path) -> None:
    """While a preparation holds the directory's lock (taken here as prepare_weights.py takes it), another
    run into it is refused and changes nothing; once the lock is released the directory can be prepared."""
    import fcntl

    from minimax_m2.weights.prepare import LOCK

    out = _prepared(float32_checkpoint, tmp_path / "w")
    before = (out / MANIFEST).read_text()
    with open(out / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write("4242")
        lock.flush()
        second = prepare(str(float32_checkpoint), "--out", str(out))  # bfloat16: would rewrite everything
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [second.stderr.strip()]
    assert second.stderr.startswith("error: ")
    assert "being written by another prepare_weights.py (pid 4242)" in second.stderr
    assert (out / MANIFEST).read_text() == before and not list(out.glob("*.tmp"))
    assert prepare(str(float32_checkpoint), "--out", str(out)).returncode == 0


def test_a_failed_run_removes_its_temporary_files(float32_checkpoint, tmp_path) -> None:
    """A write that fails (here: past a file-size limit, as a full disk would) is one error line and leaves no
    temporary file behind."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "w"
    done = subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), str(float32_checkpoint), "--out", str(out),
                           "--dtype", "float32"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "writing" in lines[-1] and "File too large" in lines[-1]
    assert not list(out.glob("*.tmp")) and not (out / MANIFEST).exists()


def test_a_rerun_after_the_source_changed_rewrites_every_rank_file(tmp_path_factory, tmp_path) -> None:
    """Same config, new tensor values: the finished rank file came from another source, so it is written
    again, and the prepared weights give the new checkpoint's logits."""
    source = tmp_path_factory.mktemp("changing")
    save(build_model(tiny_config(), seed=1), source)
    args = [str(source), "--out", str(tmp_path / "w"), "--dtype", "float32"]
    assert prepare(*args).returncode == 0
    save(build_model(tiny_config(), seed=2), source)
    done = prepare(*args)
    assert done.returncode == 0 and "(0 already complete)" in done.stdout, done.stdout + done.stderr
    assert "(1 already complete)" in prepare(*args).stdout
    want = MiniMaxM2Model.from_pretrained(source, max_seq_len=16).forward(PROMPT)
    assert relative_error(MiniMaxM2Model.from_prepared(tmp_path / "w", max_seq_len=16).forward(PROMPT), want) < 1e-6


def test_out_equal_to_the_source_is_refused_and_leaves_nothing(float32_checkpoint, tmp_path) -> None:
    source = tmp_path / "source"
    shutil.copytree(float32_checkpoint, source)
    before = sorted(p.name for p in source.iterdir())
    done = prepare(str(source), "--out", str(source))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: --out {source} is the source checkpoint's directory: give the prepared files one of their own"]
    assert sorted(p.name for p in source.iterdir()) == before


@pytest.mark.parametrize("world, tp, moe_tp", [(1, 1, 1), (4, 2, 4)])
def test_fp8_experts_prepared_as_codes(fp8_checkpoint, tmp_path, world, tp, moe_tp) -> None:
    """--fp8 keep writes each rank's expert bytes and their scales (FP8 in the file, half the bytes of the
    bf16 experts), checked on load like every tensor; ranks as threads give the logits of the checkpoint
    loaded with keep_fp8."""
    out, bf16 = tmp_path / "fp8", tmp_path / "bf16"
    flags = ("--dtype", "float32", "--ep", str(world), "--tp", str(tp), "--moe-tp", str(moe_tp))
    done = prepare(str(fp8_checkpoint), "--out", str(out), "--fp8", "keep", *flags)
    assert done.returncode == 0, done.stderr
    assert prepare(str(fp8_checkpoint), "--out", str(bf16), *flags).returncode == 0
    assert json.loads((out / MANIFEST).read_text())["fp8"] is True
    want_ids, want = MiniMaxM2Model.from_pretrained(fp8_checkpoint, max_seq_len=32, keep_fp8=True).generate(
        PROMPT, 4, return_logits=True)
    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        models = backend.run(lambda r: MiniMaxM2Model.from_prepared(
            out, max_seq_len=32, layout=ParallelLayout(world, tp, r, moe_tp=moe_tp)))
        results = backend.run(lambda r: models[r].generate(PROMPT, 4, return_logits=True))
    finally:
        collectives.set_backend(None)
    layer = models[0].weights.layers[0]
    assert layer.w13.dtype == np.uint8 and layer.w13_scale.dtype == np.float32
    reference = MiniMaxM2Model.from_prepared(bf16, max_seq_len=32, layout=ParallelLayout(world, tp, 0, moe_tp=moe_tp))
    assert layer.w13.nbytes == reference.weights.layers[0].w13.nbytes // 4  # float32 there, one byte here
    for ids, logits in results:
        np.testing.assert_array_equal(ids, want_ids)
        assert relative_error(logits, want) < 1e-6


def test_fp8_keep_needs_an_fp8_checkpoint(float32_checkpoint, tmp_path) -> None:
    done = prepare(str(float32_checkpoint), "--out", str(tmp_path / "w"), "--fp8", "keep")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --fp8 keep needs an FP8 checkpoint: this one has no quantization_config"]
