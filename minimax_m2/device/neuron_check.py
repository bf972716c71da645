"""Checking the device program on NeuronCores against the NumPy run, beside the projection.

`check_device(cpu, device, ...)` takes two models of the same weights and layout, one run by NumPy and one
by a `NeuronRunner`, and:

1. builds the serving engine over the device model and warms it up: every program of its shape set is
   compiled and run once (the count must equal `Engine.programs`); then new shapes are refused;
2. generates greedily on the device, one request alone and then a full batch, and times each step: TTFT
   (until a request's first token), TPOT (decode steps), launches and host-device bytes per decode step;
3. generates again for other prompts keeping the logits, runs the device's token sequences teacher-forced
   through the NumPy model and compares the logits at every position (max |difference| / max |logit|,
   within `tolerance`) and the tokens (each device token is the NumPy argmax, unless the NumPy top two are
   closer than the tolerance allows to tell apart);
4. projects the same TTFT and TPOT with the roofline (minimax_m2/device/roofline.py, trn2 figures).

Every rank runs it with the same arguments (the engine is deterministic, so every rank steps through
the same plans in lockstep). benchmarks/verify_neuron.py is its command line.
"""

import time
from dataclasses import asdict, dataclass

import numpy as np

from minimax_m2.device.neuron import NeuronRunner, compile_share
from minimax_m2.device.roofline import DECODE_HOST_BYTES_PER_ROW, TRN2, decode_launches, record_units, served_seconds
from minimax_m2.generation import Sampling
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.serving.engine import Engine
from minimax_m2.serving.request import Request

HOST_BYTES_PER_ROW_LIMIT = 64  # a steady decode step's host-device traffic per row (issue 18's bound)


@dataclass
class Row:
    """One line of the report: what was measured, what it is held to, whether it holds."""

    name: str
    measured: float
    expected: float | None
    ok: bool | None  # None: reported beside the projection, not checked


@dataclass
class Timing:
    ttft_s: float
    tpot_s: float
    decode_steps: int
    launches: float  # per decode step
    host_bytes_per_row: float  # per decode step and row of the step (padding rows included)


def _timed(engine: Engine, runner: NeuronRunner, requests: list[Request]) -> Timing:
    """Step the engine until `requests` end: the first token's time (from the first step) and the mean time
    of the steady decode steps (every request decoding, as in the step before), with their launches and
    host-device bytes."""
    rows, execute = [], engine.executor.execute

    def counted(step):
        rows.append(step.input_ids.shape[0])
        return execute(step)

    engine.executor.execute = counted
    start, first, decode = time.perf_counter(), None, []
    launches = moved = steady_rows = 0
    decoding = False
    try:
        while any(r.finish_reason is None for r in requests):
            steady, decoding = decoding and all(r.decoding for r in requests), all(r.decoding for r in requests)
            before = (time.perf_counter(), runner.launches, runner.uploaded + runner.downloaded, len(rows))
            engine.step()
            if steady:
                decode.append(time.perf_counter() - before[0])
                launches += runner.launches - before[1]
                moved += runner.uploaded + runner.downloaded - before[2]
                steady_rows += sum(rows[before[3]:])
            if first is None and all(r.generated for r in requests):
                first = time.perf_counter() - start
    finally:
        engine.executor.execute = execute
    steps = max(1, len(decode))
    return Timing(first or 0.0, float(np.mean(decode)) if decode else 0.0, len(decode), launches / steps,
                  moved / max(1, steady_rows))


def teacher_forced(cpu: MiniMaxM2Model, prompt: list[int], generated: list[int], device_logits: np.ndarray,
                   tolerance: float) -> tuple[float, int, int]:
    """The NumPy model over prompt + generated[:-1] -> (max |logit difference| / max |logit|, device tokens
    that are the NumPy argmax or a near-tie, device tokens)."""
    ids = np.array([prompt + generated[:-1]])
    cpu.reset()
    want = cpu.forward(ids)[0]  # [positions, vocab] float32
    got = np.asarray(device_logits, np.float32)
    error = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    scale = np.max(np.abs(want))
    agree = 0
    for i, token in enumerate(generated):
        row = want[len(prompt) - 1 + i]
        best = int(np.argmax(row))
        agree += token == best or row[best] - row[token] <= 2 * tolerance * scale
    return error, agree, len(generated)


def projected(device: MiniMaxM2Model, phase: str, batch: int, seq: int) -> float:
    """The roofline's served seconds of one step of this model and layout on trn2."""
    costs = record_units(device.config, device.layout, phase=phase, batch=batch, seq=seq, context=device.max_seq_len,
                         dtype=device.dtype)
    return served_seconds(costs, device.config.num_hidden_layers, TRN2, phase, batch if phase == "decode" else seq)


def check_device(cpu: MiniMaxM2Model, device: MiniMaxM2Model, runner: NeuronRunner, *, prompt_len: int,
                 new_tokens: int, batch: int, prefill_chunk: int, tolerance: float, seed: int = 0) -> dict:
    """The report (see the module docstring): {'rows': [Row...], 'ok': bool, ...}."""
    engine = Engine(device, max_num_seqs=batch, prefill_chunk=prefill_chunk)
    units = list(engine.programs().values())
    expected_programs = len(units)
    start = time.perf_counter()
    timed, ranks = compile_share(runner, units, device.layout.world_groups)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    steps = engine.warm_up(every_shape=True)
    warm_up_s = time.perf_counter() - start
    compiled = runner.compiled
    runner.frozen = True

    rng = np.random.default_rng(seed)
    vocab = device.config.vocab_size
    sampling = Sampling(max_new_tokens=new_tokens)

    def prompts(n: int) -> list[list[int]]:
        return [rng.integers(0, vocab, max(1, prompt_len - i % 3)).tolist() for i in range(n)]

    timings = [_timed(engine, runner, [engine.submit(p, sampling) for p in prompts(n)]) for n in (1, batch)]
    results = [engine.submit(p, sampling, keep_logits=True) for p in prompts(batch)]
    while not engine.idle():
        engine.step()
    errors, agree, total = 0.0, 0, 0
    for request in results:
        e, a, n = teacher_forced(cpu, request.prompt, request.generated, np.concatenate(request.logits), tolerance)
        errors, agree, total = max(errors, e), agree + a, total + n

    one, many = timings
    layers = device.config.num_hidden_layers
    rows = [
        Row("programs compiled", compiled, expected_programs, compiled == expected_programs),
        Row(f"compile seconds, this rank's share ({len(timed)} of {expected_programs} programs, {ranks} ranks "
            "on this host)", compile_s, None, None),
        Row("slowest compile of the share, seconds", max((t for _, t in timed), default=0.0), None, None),
        Row("warm-up seconds (load and run every shape)", warm_up_s, None, None),
        Row("device tokens that are the NumPy argmax (or a near-tie)", agree, total, agree == total),
        Row("logits: max |difference| / max |logit|", errors, tolerance, errors <= tolerance),
        Row(f"TTFT ms, one prompt of {prompt_len} tokens", one.ttft_s * 1e3,
            projected(device, "prefill", 1, prompt_len) * 1e3, None),
        Row("TPOT ms, batch 1", one.tpot_s * 1e3, projected(device, "decode", 1, 1) * 1e3, None),
        Row(f"TPOT ms, batch {batch}", many.tpot_s * 1e3, projected(device, "decode", batch, 1) * 1e3, None),
        Row("launches per decode step", one.launches, decode_launches(layers), one.launches == decode_launches(layers)),
        Row("host-device bytes per decode step per row", many.host_bytes_per_row, DECODE_HOST_BYTES_PER_ROW,
            many.host_bytes_per_row <= HOST_BYTES_PER_ROW_LIMIT),
    ]
    return {"rows": [asdict(r) for r in rows], "ok": all(r.ok is not False for r in rows), "warm_up_steps": steps,
            "layout": {"world": device.layout.world, "tp": device.layout.tp, "moe_tp": device.layout.moe_tp},
            "dtype": str(device.dtype), "timings": [asdict(t) for t in timings]}


def format_report(report: dict) -> str:
    """The report as a markdown table."""
    lines = ["| check | measured | expected / projected | result |", "|---|---|---|---|"]
    for r in report["rows"]:
        expected = "" if r["expected"] is None else f"{r['expected']:.4g}"
        result = {True: "ok", False: "FAILED", None: ""}[r["ok"]]
        lines.append(f"| {r['name']} | {r['measured']:.4g} | {expected} | {result} |")
    return "\n".join(lines)
