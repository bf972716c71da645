"""benchmarks/verify_neuron.py's logic (minimax_m2/device/neuron_check.py), run with the counting stand-ins for
nkipy's runtime: the report compares the device's tokens and logits with NumPy, counts programs, launches
and host bytes, and fails when the device disagrees."""

from pathlib import Path

import numpy as np
import pytest
from test_neuron_runner import STAND_INS, FakeKernel, FakeTensor

from minimax_m2 import MiniMaxM2Model
from minimax_m2.device.neuron import NeuronRunner, run_on
from minimax_m2.device.neuron_check import check_device, format_report
from minimax_m2.run import random_config

CONFIG = random_config(128, 2, 8, 2, 256)


def _models(build_dir: Path, dtype: str = "float32") -> tuple[MiniMaxM2Model, MiniMaxM2Model, NeuronRunner]:
    FakeTensor.reset()
    FakeKernel.compiled.clear()
    runner = NeuronRunner(build_dir, runtime=STAND_INS)
    cpu = MiniMaxM2Model.random(CONFIG, seed=3, max_seq_len=64, dtype=dtype)
    device = run_on(MiniMaxM2Model.random(CONFIG, seed=3, max_seq_len=64, dtype=dtype), runner)
    return cpu, device, runner


def _check(cpu, device, runner, tolerance: float = 1e-5) -> dict:
    return check_device(cpu, device, runner, prompt_len=12, new_tokens=8, batch=3, prefill_chunk=16,
                        tolerance=tolerance)


@pytest.fixture(autouse=True)
def neuron_environment(monkeypatch) -> None:
    for name in ("NEURON_RT_VISIBLE_CORES", "NEURON_RT_ROOT_COMM_ID"):
        monkeypatch.delenv(name, raising=False)


def test_a_faithful_device_passes_every_check(tmp_path) -> None:
    report = _check(*_models(tmp_path))
    rows = {r["name"]: r for r in report["rows"]}
    assert report["ok"], format_report(report)
    assert rows["programs compiled"]["measured"] == rows["programs compiled"]["expected"] > 0
    assert rows["launches per decode step"]["measured"] == CONFIG.num_hidden_layers + 2
    assert rows["device tokens that are the NumPy argmax (or a near-tie)"]["measured"] == 3 * 8, "3 requests x 8 tokens"
    assert rows["logits: max |difference| / max |logit|"]["measured"] <= 1e-5
    assert 0 < rows["host-device bytes per decode step per row"]["measured"] <= 12
    assert all(r["expected"] > 0 for r in report["rows"] if r["name"].startswith(("TTFT", "TPOT")))
    assert "| programs compiled |" in format_report(report)


def test_bfloat16_is_held_to_its_tolerance(tmp_path) -> None:
    cpu, device, runner = _models(tmp_path, "bfloat16")
    assert _check(cpu, device, runner, tolerance=2e-2)["ok"]


def test_a_device_that_computes_something_else_fails(tmp_path) -> None:
    """The device's lm_head weights differ from the NumPy model's: tokens and logits disagree."""
    cpu, device, runner = _models(tmp_path)
    device.weights.lm_head = device.weights.lm_head * np.float32(1.5)
    report = _check(cpu, device, runner)
    rows = {r["name"]: r for r in report["rows"]}
    assert not report["ok"]
    assert rows["logits: max |difference| / max |logit|"]["ok"] is False
    assert "FAILED" in format_report(report)
