"""run_example.py end to end, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import PROMPT
from hf_reference import greedy_logits, relative_error

from minimax_m2.run import run_kernel_checks

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_example.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_mode_test_passes_every_kernel() -> None:
    result = _run("--mode", "test")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and result.stdout.count("PASS") >= 9


def test_failing_check_is_reported() -> None:
    def broken() -> None:
        raise AssertionError("wrong")

    assert run_kernel_checks({"ok": lambda: None, "broken": broken}) is False


def test_mode_random_prints_tokens_and_timings() -> None:
    result = _run("--mode", "random", "--num-layers", "2", "--max-new-tokens", "3", "--batch", "2")
    assert result.returncode == 0, result.stderr
    assert "[1] generated ids:" in result.stdout and "ms/step" in result.stdout and "tokens/s" in result.stdout


def test_mode_generate_writes_json_and_logits(hf_model, sharded_checkpoint, tmp_path) -> None:
    steps = 4
    out_json, out_logits = tmp_path / "out.json", tmp_path / "logits.npy"
    rows = [",".join(map(str, row)) for row in PROMPT]
    result = _run(
        "--mode", "generate", "--checkpoint", str(sharded_checkpoint), "--prompt-ids", rows[0], "--prompt-ids", rows[1],
        "--max-new-tokens", str(steps), "--max-seq-len", "32", "--output-json", str(out_json),
        "--dump-logits", str(out_logits),
    )
    assert result.returncode == 0, result.stderr
    want_tokens, want_logits = greedy_logits(hf_model, PROMPT, steps)
    written = json.loads(out_json.read_text())
    assert written["prompt_ids"] == PROMPT.tolist()
    assert written["generated_ids"] == want_tokens[:, PROMPT.shape[1]:].tolist()
    logits = np.load(out_logits)
    assert logits.dtype == np.float32 and logits.shape == (2, PROMPT.shape[1] + steps - 1, 256)
    assert relative_error(logits, want_logits) < 1e-5


def test_mode_generate_bad_ids_fail_clearly(float32_checkpoint) -> None:
    result = _run("--mode", "generate", "--checkpoint", str(float32_checkpoint), "--prompt-ids", "1,2,999")
    assert result.returncode != 0
    assert "outside the vocabulary" in result.stderr
