"""run_example.py as a user meets it: one-line `error:` naming the flag or key (exit 2, before any work),
warnings for flags without effect, generation_config.json defaults, EOS, chat and streamed text."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PROMPT, free_port

from minimax_m2 import MiniMaxM2Model
from minimax_m2.serving.detokenize import IncrementalDetokenizer

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_example.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0], lines[0]


def _config_without(checkpoint: Path, tmp_path: Path, change) -> Path:
    shutil.copytree(checkpoint, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    change(config)
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    return tmp_path / "c"


@pytest.mark.parametrize("args, message", [
    (["--mode", "generate", "--prompt-ids", "1,2"], "--mode generate needs --checkpoint DIR or --weights DIR"),
    (["--mode", "random", "--experts", "a,b"], "--experts takes ids and ranges like 0-7 or 0,3,5"),
    (["--mode", "random", "--tp", "2"], "launch with torchrun --nproc-per-node 1"),
    (["--mode", "random", "--temperature", "nan"], "--temperature must be a finite number"),
    (["--mode", "random", "--top-p", "1.5", "--temperature", "1"], "--top-p must be in (0, 1]"),
    (["--mode", "random", "--batch", "0"], "--batch is 0, expected an integer in [1,"),
    (["--mode", "random", "--vocab-size", "0"], "--vocab-size must be at least 1"),
    (["--mode", "random", "--max-new-tokens", "0"], "--max-new-tokens is 0, expected an integer in [1,"),
    (["--mode", "random", "--output-json", "/nonexistent-dir/out.json"],
     "--output-json /nonexistent-dir/out.json: cannot write"),
    (["--mode", "random", "--dump-logits", "/proc/x.npy"], "--dump-logits /proc/x.npy: cannot write"),
    (["--mode", "random", "--prompt-len", "30", "--max-seq-len", "16"], "exceeds --max-seq-len 16"),
    (["--mode", "random", "--prompt", "hi"], "--prompt and --chat need a checkpoint's tokenizer"),
])
def test_bad_flags_fail_before_any_work(args, message) -> None:
    assert_one_line_error(run(*args), message)


def test_neuron_device_needs_nkipy() -> None:
    try:
        import nkipy.runtime  # noqa: F401
    except ImportError:
        assert_one_line_error(run("--mode", "random", "--device", "neuron"), "needs nkipy")
    else:
        pytest.skip("nkipy is installed: this host can compile for a NeuronCore")


def test_generate_needs_exactly_one_prompt(float32_checkpoint) -> None:
    assert_one_line_error(run("--mode", "generate", "--checkpoint", str(float32_checkpoint)),
                          "needs exactly one of --prompt-ids, --prompt or --chat")


def test_empty_prompt(with_tokenizer) -> None:
    assert_one_line_error(run("--mode", "generate", "--checkpoint", str(with_tokenizer), "--prompt", " "),
                          "--prompt is empty")


@pytest.mark.parametrize("flag", ["--prompt", "--chat"])
def test_a_prompt_that_is_not_utf8_is_named(with_tokenizer, flag) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "run_example.py"), "--mode", "generate", "--checkpoint",
                           str(with_tokenizer), flag, b"caf\xff"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert_one_line_error(done, f"{flag} is not valid UTF-8 text")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("hidden_size"), "config.json lacks 'hidden_size'"),
    (lambda c: c.update(hidden_size="128"), "config.json: 'hidden_size' is '128', expected an integer"),
])
def test_bad_config_is_named(float32_checkpoint, tmp_path, change, message) -> None:
    path = _config_without(float32_checkpoint, tmp_path, change)
    assert_one_line_error(run("--mode", "generate", "--checkpoint", str(path), "--prompt-ids", "1,2"), message)


def test_warnings_for_flags_without_effect(float32_checkpoint) -> None:
    done = run("--mode", "random", "--num-layers", "1", "--max-new-tokens", "2", "--top-k", "5",
               "--checkpoint", str(float32_checkpoint), "--max-seq-len", "300000")
    assert done.returncode == 0, done.stderr
    assert "warning: --top-k / --top-p have no effect at temperature 0" in done.stderr
    assert "warning: --checkpoint / --weights have no effect in random mode" in done.stderr
    assert "exceeds the model's max_position_embeddings" in done.stderr


def test_help_documents_every_option() -> None:
    import run_example

    actions = [a for a in run_example.build_parser()._actions if a.option_strings]
    undocumented = [a.option_strings[0] for a in actions if not a.help]
    assert undocumented == [], f"options without help: {undocumented}"
    with_default = [a for a in actions if a.default not in (None, False) and a.default != "==SUPPRESS=="]
    undocumented = [a.option_strings[0] for a in with_default if "default" not in a.help]
    assert not undocumented, undocumented
    assert run("--help").returncode == 0


def test_random_seed_changes_sampling_only() -> None:
    outs = [run("--mode", "random", "--num-layers", "1", "--max-new-tokens", "4", "--temperature", "1", "--seed", s)
            for s in ("1", "2")]
    prompts = [line for out in outs for line in out.stdout.splitlines() if "prompt ids" in line]
    assert prompts[0] == prompts[1], "--seed must not change the random model or prompt"


def test_generation_config_and_eos(float32_checkpoint, tmp_path) -> None:
    """generation_config.json gives the defaults; a row stops at its EOS, and generation ends when all have."""
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    greedy = model.generate(PROMPT, 6)[:, PROMPT.shape[1]:]
    eos = int(greedy[0, 2])
    ids = model.generate(PROMPT, 6, eos_token_ids=(eos,))[:, PROMPT.shape[1]:]
    assert ids[0, 2] == eos and (ids[0, 3:] == eos).all(), "row 0 continues after its EOS"
    if eos not in greedy[1]:
        np.testing.assert_array_equal(ids[1], greedy[1][: ids.shape[1]])
    path = tmp_path / "c"
    shutil.copytree(float32_checkpoint, path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 9999], "do_sample": False}))
    out = tmp_path / "ids.json"
    done = run("--mode", "generate", "--checkpoint", str(path), "--prompt-ids", ",".join(map(str, PROMPT[0])),
               "--max-new-tokens", "6", "--output-json", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["generated_ids"] == [greedy[0, :3].tolist()]


def test_incremental_detokenizer_holds_split_characters(with_tokenizer) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(with_tokenizer / "tokenizer.json"))
    text = "héllo wörld ☃!"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text), "multi-byte characters must span several tokens"
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.feed(i) for i in ids]
    assert "".join(pieces) == text
    assert "" in pieces and all("\ufffd" not in p for p in pieces)
    assert detokenizer.feed(10**6) == "" and detokenizer.unknown == [10**6]


def test_chat_streams_text_and_parses_output(with_tokenizer) -> None:
    done = run("--mode", "generate", "--checkpoint", str(with_tokenizer), "--chat", "system: Be brief.", "--chat",
               "Hi there", "--max-new-tokens", "5", "--max-seq-len", "400")
    assert done.returncode == 0, done.stderr
    assert "reasoning: " in done.stdout and "content: " in done.stdout and "[0] text:" in done.stdout


def test_serve_mode_answers_on_loopback(with_tokenizer) -> None:
    """run_example.py --mode serve as a user starts it: /v1/models answers, then the process is stopped."""
    import urllib.request

    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "run_example.py"), "--mode", "serve", "--checkpoint",
                               str(with_tokenizer), "--port", str(port), "--max-seq-len", "256"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        answer = None
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as reply:
                    answer = json.loads(reply.read())
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.1)
        assert answer and answer["data"][0]["id"] == with_tokenizer.name
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_needs_a_tokenizer(float32_checkpoint) -> None:
    assert_one_line_error(run("--mode", "serve", "--checkpoint", str(float32_checkpoint)), "--mode serve needs")


@pytest.mark.parametrize("args, message", [
    (["--mode", "random", "--experts", "0-99999999999"],
     "--experts '0-99999999999' is not an ascending range inside 0..15"),
    (["--mode", "random", "--max-seq-len", "2000000000"], "--max-seq-len is 2000000000, expected an integer in"),
    (["--mode", "random", "--batch", "100000000"], "--batch is 100000000, expected an integer in"),
    (["--mode", "random", "--collective-timeout", "-5"], "--collective-timeout is -5.0, expected a finite number"),
    (["--mode", "random", "--prompt-ids", "99999999999999999999999"],
     "--prompt-ids 99999999999999999999999 is not a token id"),
    (["--mode", "random", "--max-seq-len", "16000000"], "cannot hold one request of --max-seq-len 16000000"),
    (["--mode", "random", "--hidden-size", "3072", "--num-layers", "62", "--num-experts", "256",
      "--experts-per-token", "8", "--vocab-size", "200064"], "GiB per rank (weights"),
    (["--mode", "random", "--max-new-tokens", "2", "--dump-logits", "/dev/full"],
     "--dump-logits /dev/full: No space left"),
])
def test_oversized_or_unwritable_runs_are_refused(args, message) -> None:
    """Sizes are checked, and memory planned, before anything is allocated; a full disk is an error, not 'wrote'."""
    start = time.monotonic()
    done = run(*args)
    assert_one_line_error(done, message)
    assert time.monotonic() - start < 60
    assert "wrote" not in done.stdout


@pytest.mark.parametrize("content, message", [
    ("", "is not a tokenizer file the `tokenizers` package can read"),
    ('{"version": "1.0", "model": {"type": "BPE", "vocab":', "is not a tokenizer file"),
])
def test_broken_tokenizer_is_named(with_tokenizer, tmp_path, content, message) -> None:
    path = shutil.copytree(with_tokenizer, tmp_path / "c")
    (path / "tokenizer.json").write_text(content)
    assert_one_line_error(run("--mode", "generate", "--checkpoint", str(path), "--prompt", "hi"), message)


def test_broken_chat_template_is_named(with_tokenizer, tmp_path) -> None:
    path = shutil.copytree(with_tokenizer, tmp_path / "c")
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    assert_one_line_error(run("--mode", "generate", "--checkpoint", str(path), "--chat", "hi"),
                          "the checkpoint's chat template line 1:")


def test_broken_manifest_is_named(float32_checkpoint, tmp_path) -> None:
    out = tmp_path / "w"
    assert subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), str(float32_checkpoint), "--out",
                           str(out)],
                          capture_output=True, timeout=120, cwd=ROOT).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["layout"] = [1, 1, 1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run("--mode", "generate", "--weights", str(out), "--prompt-ids", "1,2"),
                          "'layout' is [1, 1, 1], expected a JSON object")


def test_sigterm_ends_a_busy_server_within_seconds(with_tokenizer) -> None:
    """SIGTERM while a long completion streams: the stream ends (finish_reason 'abort') and the process exits
    within a few seconds, without a traceback; nothing waits for the generation to run its course."""
    import signal
    import socket

    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "run_example.py"), "--mode", "serve", "--checkpoint",
                               str(with_tokenizer), "--port", str(port), "--max-seq-len", "4096"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": 3500,
                           "stream": True}).encode()
        deadline = time.monotonic() + 60
        while True:
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        with raw:
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while received.count(b"data:") < 5:
                received += raw.recv(4096)
            server.send_signal(signal.SIGTERM)
            start = time.monotonic()
            while chunk := raw.recv(4096):
                received += chunk
        assert b'"finish_reason": "abort"' in received and b"data: [DONE]" in received
        assert server.wait(timeout=15) in (0, -15)  # uvicorn re-raises the signal once it has shut down
        assert time.monotonic() - start < 10 and "Traceback" not in server.stderr.read().decode()
    finally:
        server.kill()
        server.wait(timeout=10)


def test_plan_mode_says_whether_a_run_fits_without_loading_weights(float32_checkpoint) -> None:
    done = run("--mode", "plan", "--checkpoint", str(float32_checkpoint), "--max-num-seqs", "4", "--max-seq-len", "64")
    assert done.returncode == 0, done.stderr
    assert "memory plan per rank: weights" in done.stdout and "compile set per rank:" in done.stdout
    assert "KV pool: 4 blocks of 128 positions per attention group: 512 tokens" in done.stdout  # 4 contexts of 64
    assert "fits:" in done.stdout
    real = ["--mode", "plan", "--config", "real", "--ep", "64", "--tp", "8", "--moe-tp", "64", "--device", "neuron",
            "--max-num-seqs", "32", "--prefill-chunk", "2048", "--max-seq-len", "196608"]
    fits = run(*real)
    assert fits.returncode == 0, fits.stderr
    pool = int(fits.stdout.split("KV pool: ")[1].split(" blocks")[0].replace(",", ""))
    assert pool * 128 >= 350_000 and "62 layers, hidden 3072, 256 of 256 experts" in fits.stdout
    programs = int(fits.stdout.split("step shapes, ")[1].split(" programs")[0])
    assert programs <= 300 and "spread over the 64 ranks of a host 2 min / 10 min / 25 min" in fits.stdout
    speculating = run(*real, "--speculative", "ngram")  # its verify steps are programs too (plain and spread)
    assert int(speculating.stdout.split("step shapes, ")[1].split(" programs")[0]) > programs
    assert_one_line_error(run(*real, "--kv-blocks", "4000"), "but one NeuronCore's HBM (trn2, LNC=2) is 24.00 GiB")
    kept = run(*real, "--fp8", "keep")  # the released checkpoint's experts as 8-bit codes: a larger pool
    assert kept.returncode == 0 and "FP8 experts kept as codes" in kept.stdout
    assert int(kept.stdout.split("KV pool: ")[1].split(" blocks")[0].replace(",", "")) > pool
    assert_one_line_error(run(*real, "--fp8", "keep", "--kv-blocks", "5000"), "is 24.00 GiB")
    assert_one_line_error(run(*real, "--kv-blocks", "1000"), "cannot hold one request of --max-seq-len 196608")
    assert_one_line_error(run("--mode", "generate", "--config", "real", "--prompt-ids", "1"),
                          "--config real is for --mode plan and --mode compile")


def test_prepared_fp8_experts_run_as_the_checkpoint_kept_in_fp8(fp8_checkpoint, tmp_path) -> None:
    """Experts prepared as FP8 codes (prepare_weights.py --fp8 keep) generate what --checkpoint --fp8 keep
    does; the memory plan counts their bytes; --fp8 beside --weights is refused (chosen when preparing)."""
    out = tmp_path / "w"
    done = subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), str(fp8_checkpoint), "--out", str(out),
                           "--dtype", "float32", "--fp8", "keep"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    common = ("--mode", "generate", "--prompt-ids", "5,17,200,3", "--max-new-tokens", "6", "--max-seq-len", "32")
    prepared = run(*common, "--weights", str(out), "--output-json", str(tmp_path / "a.json"))
    kept = run(*common, "--checkpoint", str(fp8_checkpoint), "--fp8", "keep", "--output-json", str(tmp_path / "b.json"))
    assert prepared.returncode == 0 and kept.returncode == 0, prepared.stderr + kept.stderr
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())
    plan = run("--mode", "plan", "--weights", str(out), "--max-seq-len", "32")
    assert "FP8 experts kept as codes" in plan.stdout, plan.stdout + plan.stderr
    assert_one_line_error(run(*common, "--weights", str(out), "--fp8", "keep"), "--fp8 has no effect with --weights")


def test_compile_mode_without_the_neuron_sdk_says_what_it_needs() -> None:
    """--mode compile plans first (its plan is printed), then needs nkipy's compiler: one error line."""
    try:
        import nkipy.runtime  # noqa: F401
    except ImportError:
        done = run("--mode", "compile", "--config", "real", "--ep", "64", "--tp", "8", "--moe-tp", "64",
                   "--max-seq-len", "4096")
        assert "compile set per rank:" in done.stdout
        assert_one_line_error(done, "needs nkipy and the Neuron SDK")
    else:
        pytest.skip("nkipy is installed: this host can compile")
