"""Real multi-process runs under torchrun (gloo): expert parallelism over W ranks and tensor-parallel
attention give the single-process logits and tokens; failures end every rank with a named culprit."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DECODE_STEPS, PROMPT
from hf_reference import build_model, relative_error, save, tiny_config

from minimax_m2 import MiniMaxM2Model
from minimax_m2.run import random_config

pytest.importorskip("torch.distributed")

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
TIMEOUT = 240


def torchrun(world: int, script: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def run_ranks(world: int, tp: int, tmp_path: Path, *args: str, moe_tp: int = 1) -> tuple[np.ndarray, np.ndarray, str]:
    """run_example.py over `world` ranks -> (all ids, logits at every position, rank 0's stdout)."""
    out_json, out_logits = tmp_path / f"ids_{world}_{tp}_{moe_tp}.json", tmp_path / f"logits_{world}_{tp}_{moe_tp}.npy"
    prompts = [arg for row in PROMPT for arg in ("--prompt-ids", ",".join(map(str, row)))]
    done = torchrun(
        world, ROOT / "run_example.py", *args, *prompts, "--ep", str(world), "--tp", str(tp), "--moe-tp", str(moe_tp),
        "--max-new-tokens", str(DECODE_STEPS + 1), "--max-seq-len", "32", "--collective-timeout", "60",
        "--output-json", str(out_json), "--dump-logits", str(out_logits),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out_json.read_text())
    return np.concatenate([result["prompt_ids"], result["generated_ids"]], axis=1), np.load(out_logits), done.stdout


def assert_same(got_ids, got_logits, want_ids, want_logits) -> None:
    assert got_logits.shape == want_logits.shape
    n = PROMPT.shape[1]
    assert relative_error(got_logits[:, :n], want_logits[:, :n]) < RTOL, "prefill logits differ"
    for step in range(DECODE_STEPS):
        error = relative_error(got_logits[:, n + step], want_logits[:, n + step])
        assert error < RTOL, f"decode step {step + 1} differs"
    np.testing.assert_array_equal(got_ids, want_ids)


def single(path: Path, experts: list[int] | None = None):
    model = MiniMaxM2Model.from_pretrained(path, experts=experts, max_seq_len=32)
    return model.generate(PROMPT, max_new_tokens=DECODE_STEPS + 1, return_logits=True)


# Every layout's exactness is tested with ranks as threads (test_moe_parallel, test_nkipy_semantics,
# test_fp8_device); these runs prove the same over real gloo processes: every W = 2 layout, and at W = 4
# one layout with several attention and expert groups and one with every expert sliced over all ranks.
LAYOUTS = [(2, 1, 1), (2, 2, 1), (2, 1, 2), (2, 2, 2), (4, 2, 2), (4, 1, 4)]


@pytest.mark.parametrize("world, tp, moe_tp", LAYOUTS, ids=[f"w{w}-tp{t}-moetp{m}" for w, t, m in LAYOUTS])
def test_matches_single_process(float32_checkpoint, tmp_path, world, tp, moe_tp) -> None:
    ids, logits, stdout = run_ranks(world, tp, tmp_path, "--mode", "generate", "--checkpoint", str(float32_checkpoint),
                                    moe_tp=moe_tp)
    assert_same(ids, logits, *single(float32_checkpoint))
    assert f"ranks {world} (tp {tp}, moe_tp {moe_tp}" in stdout


FP8_LAYOUTS = [(2, 2, 2, "dequantize"), (2, 2, 1, "keep"), (2, 1, 2, "keep"),
               (4, 2, 2, "keep"), (4, 1, 4, "keep")]


@pytest.mark.parametrize("world, tp, moe_tp, fp8", FP8_LAYOUTS, ids=[f"w{w}-tp{t}-moetp{m}-{f}" for w, t, m, f in
                                                                     FP8_LAYOUTS])
def test_fp8(fp8_checkpoint, tmp_path, world, tp, moe_tp, fp8) -> None:
    """Slices of the intermediate rows cut through the 16-row scale blocks: dequantised when loaded, or the
    experts kept as 8-bit codes and decoded inside the units; both give the single process's dequantised
    logits."""
    ids, logits, _ = run_ranks(world, tp, tmp_path, "--mode", "generate", "--checkpoint", str(fp8_checkpoint), "--fp8",
                               fp8, moe_tp=moe_tp)
    assert_same(ids, logits, *single(fp8_checkpoint))


@pytest.mark.parametrize("moe_tp", [1, 2], ids=["experts-spread", "experts-sliced"])
def test_expert_subset(float32_checkpoint, tmp_path, moe_tp) -> None:
    experts = [0, 2, 3, 5, 8, 9, 12, 15]
    ids, logits, _ = run_ranks(
        2, 1, tmp_path, "--mode", "generate", "--checkpoint", str(float32_checkpoint),
        "--experts", ",".join(map(str, experts)),
        moe_tp=moe_tp,
    )
    assert_same(ids, logits, *single(float32_checkpoint, experts))


@pytest.fixture(scope="module")
def all_on_rank_0(tmp_path_factory) -> Path:
    """Router bias making every token choose experts 0..3: all on rank 0 (of 2 or 4: worst-case capacity)."""
    config = tiny_config()
    return save(build_model(config, seed=5, bias_shift={e: 10.0 for e in range(config.num_experts_per_tok)}),
                tmp_path_factory.mktemp("skewed_ep"))


def test_every_token_on_one_rank(all_on_rank_0, tmp_path) -> None:
    ids, logits, _ = run_ranks(2, 1, tmp_path, "--mode", "generate", "--checkpoint", str(all_on_rank_0))
    assert_same(ids, logits, *single(all_on_rank_0))


def test_capacity_factor_reports_drops(all_on_rank_0, tmp_path) -> None:
    _, _, stdout = run_ranks(4, 1, tmp_path, "--mode", "generate", "--checkpoint", str(all_on_rank_0),
                             "--capacity-factor", "1")
    dropped = int(stdout.split("capacity factor 1: ")[1].split()[0])
    assert dropped > 0


def test_random_mode_matches_single_process(tmp_path) -> None:
    args = ["--mode", "random", "--num-layers", "2", "--num-experts", "8", "--hidden-size", "256", "--vocab-size",
            "300", "--model-seed", "3"]
    ids, logits, _ = run_ranks(2, 2, tmp_path, *args)
    config = random_config(256, 2, 8, 4, 300)
    model = MiniMaxM2Model.random(config, seed=3, max_seq_len=32)
    assert_same(ids, logits, *model.generate(PROMPT, max_new_tokens=DECODE_STEPS + 1, return_logits=True))


def test_layout_that_does_not_fit_is_refused(float32_checkpoint) -> None:
    done = torchrun(2, ROOT / "run_example.py", "--mode", "generate", "--checkpoint", str(float32_checkpoint),
                    "--prompt-ids", "1,2", "--ep", "2", "--tp", "2", "--moe-tp", "1", "--experts", "0,1,2,3,4")
    assert_bad_input_ends_every_rank(done, "5 loaded experts cannot be spread evenly over 2 rank groups")


def assert_bad_input_ends_every_rank(done: subprocess.CompletedProcess, message: str) -> None:
    """Bad input under torchrun: one `error:` line in all, before anything torchrun says of the failed workers;
    the failing rank exits 2 and the launcher non-zero."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-2000:]
    summary = done.stderr.find("Traceback")
    assert summary < 0 or done.stderr.index(errors[0]) < summary, done.stderr[-2000:]
    assert done.stderr.count("Traceback") <= 1 and "ChildFailedError" in done.stderr, done.stderr[-2000:]


RANDOM = ["--mode", "random", "--num-layers", "1", "--num-experts", "4", "--hidden-size", "128", "--vocab-size", "64"]


# Layouts refused once the ranks have met, and a flag refused before (the other bad layouts and flags are
# tested in one process: test_parallel_layout.py, test_cli.py).
@pytest.mark.parametrize("args, message", [
    (["--ep", "2", "--tp", "3"], "tp 3 must divide the number of ranks 2"),
    (["--ep", "4"], "--ep 4 but 2 ranks are running"),
    (["--ep", "2", "--capacity-factor", "nan"], "--capacity-factor"),
], ids=["tp3", "world", "capacity-nan"])
def test_bad_flags_exit_non_zero_on_every_rank(args, message) -> None:
    assert_bad_input_ends_every_rank(torchrun(2, ROOT / "run_example.py", *RANDOM, *args), message)


@pytest.mark.parametrize("scenario", ["die", "hang"])
def test_lost_rank_ends_the_run(scenario) -> None:
    """Rank 1 of 3 dies or never arrives: the run ends well within a minute, naming rank 1."""
    start = time.monotonic()
    done = torchrun(3, ROOT / "tests" / "collective_worker.py", scenario, "3")
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    if scenario == "hang":
        assert "ranks not responding: 1" in done.stderr
    else:
        assert "local_rank: 1" in done.stderr and "exitcode: 7" in done.stderr


def test_each_rank_loads_its_prepared_file(fp8_checkpoint, tmp_path) -> None:
    out = tmp_path / "prepared"
    done = subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), str(fp8_checkpoint), "--out", str(out),
                           "--dtype", "float32", "--ep", "2", "--tp", "2", "--moe-tp", "2"],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    ids, logits, _ = run_ranks(2, 2, tmp_path, "--mode", "generate", "--weights", str(out), moe_tp=2)
    assert_same(ids, logits, *single(fp8_checkpoint))


def thread_ranks(world: int, run):
    """run(rank) on every rank, ranks as threads of this process -> rank 0's result."""
    from thread_ranks import ThreadCollectives

    from kernels import collectives

    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        return backend.run(run)[0]
    finally:
        collectives.set_backend(None)


@pytest.mark.parametrize("tp, moe_tp", [(2, 1), (1, 2)], ids=["tp2-experts-spread", "experts-sliced"])
def test_bfloat16_over_two_ranks(float32_checkpoint, tmp_path, tp, moe_tp) -> None:
    """bf16 arrays cross gloo as their bytes and are summed in float32 rank by rank: the processes give exactly
    what the same layout gives with ranks as threads, and stay within bf16 rounding of one process."""
    from minimax_m2.parallel import ParallelLayout

    ids, logits, _ = run_ranks(2, tp, tmp_path, "--mode", "generate", "--checkpoint", str(float32_checkpoint),
                               "--dtype", "bfloat16", moe_tp=moe_tp)
    want_ids, want = thread_ranks(2, lambda r: MiniMaxM2Model.from_pretrained(
        float32_checkpoint, max_seq_len=32, dtype="bfloat16", layout=ParallelLayout(2, tp, r, moe_tp=moe_tp)
    ).generate(PROMPT, max_new_tokens=DECODE_STEPS + 1, return_logits=True))
    np.testing.assert_array_equal(logits, want)
    np.testing.assert_array_equal(ids, want_ids)
    one = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32, dtype="bfloat16")
    _, single_logits = one.generate(PROMPT, max_new_tokens=DECODE_STEPS + 1, return_logits=True)
    assert relative_error(logits[:, : PROMPT.shape[1]], single_logits[:, : PROMPT.shape[1]]) < 2e-2


def test_prepared_bfloat16_with_a_text_prompt(with_tokenizer, tmp_path) -> None:
    """The README's flow: prepare (bfloat16 by default) for 2 ranks, then torchrun from the prepared directory
    alone, with a text prompt."""
    out = tmp_path / "prepared"
    done = subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), str(with_tokenizer), "--out", str(out),
                           "--ep", "2", "--tp", "2", "--moe-tp", "2"], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = tmp_path / "ids.json"
    done = torchrun(2, ROOT / "run_example.py", "--mode", "generate", "--weights", str(out), "--ep", "2", "--prompt",
                    "hello", "--max-new-tokens", "4", "--max-seq-len", "32", "--output-json", str(result))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "[0] text:" in done.stdout
    generated = json.loads(result.read_text())["generated_ids"]
    prompt = np.array(json.loads(result.read_text())["prompt_ids"])
    from minimax_m2.parallel import ParallelLayout

    want = thread_ranks(2, lambda r: MiniMaxM2Model.from_prepared(
        out, max_seq_len=32, layout=ParallelLayout(2, 2, r, moe_tp=2)).generate(prompt, max_new_tokens=4))
    assert generated == want[:, prompt.shape[1]:].tolist(), "the same preparation with ranks as threads differs"


def test_bad_input_seen_by_one_rank_ends_every_rank(fp8_checkpoint, tmp_path) -> None:
    """Rank 1's file is damaged: rank 1 says so in one line and exits 2, rank 0 (waiting in a collective) stops
    at once, quietly."""
    out = tmp_path / "prepared"
    done = subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), str(fp8_checkpoint), "--out", str(out),
                           "--ep", "2", "--moe-tp", "2"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    damaged = out / "rank-00001-of-00002.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    start = time.monotonic()
    done = torchrun(2, ROOT / "run_example.py", "--mode", "generate", "--weights", str(out), "--ep", "2",
                    "--prompt-ids", "1,2,3", "--max-seq-len", "32", "--collective-timeout", "60")
    assert_bad_input_ends_every_rank(done, "rank 1: ")
    assert "differ from what was prepared" in done.stderr
    assert time.monotonic() - start < 45


RAGGED = [[5, 17, 200], [250, 1, 64, 64, 12, 180, 33, 9, 41], [7], [99, 3, 3, 18, 200]]
RAGGED_LAYOUTS = [(2, 1, 1), (2, 2, 2), (4, 2, 2)]


@pytest.mark.parametrize("world, tp, moe_tp", RAGGED_LAYOUTS,
                         ids=[f"w{w}-tp{t}-moetp{m}" for w, t, m in RAGGED_LAYOUTS])
def test_ragged_prompts_through_the_engine(float32_checkpoint, tmp_path, world, tp, moe_tp) -> None:
    """Prompts of different lengths, batched by the engine over W ranks (2 slots per attention group, chunks
    of 4 tokens): every row's logits and tokens are what the row gives alone in one process."""
    out_json, out_logits = tmp_path / "ids.json", tmp_path / "logits.npy"
    prompts = [arg for row in RAGGED for arg in ("--prompt-ids", ",".join(map(str, row)))]
    done = torchrun(world, ROOT / "run_example.py", "--mode", "generate", "--checkpoint", str(float32_checkpoint),
                    *prompts, "--ep", str(world), "--tp", str(tp), "--moe-tp", str(moe_tp), "--max-new-tokens", "6",
                    "--max-seq-len", "32", "--max-num-seqs", "2", "--prefill-chunk", "4", "--collective-timeout", "60",
                    "--output-json", str(out_json), "--dump-logits", str(out_logits))
    assert done.returncode == 0, done.stderr[-3000:]
    generated = json.loads(out_json.read_text())["generated_ids"]
    logits = np.load(out_logits)
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    for row, prompt in enumerate(RAGGED):
        ids, want = model.generate(np.array([prompt]), max_new_tokens=6, return_logits=True)
        assert generated[row] == ids[0, len(prompt):].tolist()
        got = logits[row, : want.shape[1]]
        assert relative_error(got, want[0]) < RTOL and np.isnan(logits[row, want.shape[1]:]).all()
