"""One OpenAI endpoint over W = 2 and 4 ranks (torchrun, gloo), and the plans of W = 2 and 4 ranks as threads: rank 0
serves and schedules, every step's plan goes to every rank. Greedy completions, plain and streamed, chat and
text, equal the one-process server's; a client that disconnects frees its slot; a killed rank ends the
in-flight request with an error and every process within the collective timeout; SIGTERM to the launcher
drains and stops both ranks, and so does a launcher killed outright."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch.distributed")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from conftest import free_port  # noqa: E402
from test_server import _metric  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from minimax_m2 import MiniMaxM2Model  # noqa: E402
from minimax_m2.generation import Sampling  # noqa: E402
from minimax_m2.serving.engine import Engine  # noqa: E402
from minimax_m2.serving.server import ServedModel, make_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 20  # collective timeout of the served ranks, seconds
SCHEMA = json.dumps({"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                     "tag": {"enum": ["a", "b"]}}, "required": ["id", "tag"],
                     "additionalProperties": False})
REQUESTS = [("chat", "Hello there", 6), ("chat", "What is the weather like?", 9), ("text", "Once upon a", 7),
            ("chat", "x", 4), ("text", "The quick brown fox jumps over", 8), ("text", "JSON:", 40, SCHEMA)]


class RankServer:
    """torchrun --nproc-per-node W run_example.py --mode serve ... on 127.0.0.1, stopped on exit."""

    def __init__(self, world: int, source: list[str], *flags: str):
        self.port = free_port()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   str(ROOT / "run_example.py"), "--mode", "serve", *source, "--ep", str(world),
                   "--port", str(self.port), "--max-seq-len", "256", "--max-num-seqs", "4",
                   "--collective-timeout", str(TIMEOUT), *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                        start_new_session=True)
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(iter(lambda: self.process.stdout.readline().decode(), "")),
                         daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "RankServer":
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "".join(self.output)[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("the ranks did not start serving within 120 s")

    def __exit__(self, *_) -> None:
        """Kill the launcher and every worker: torchrun starts each worker in a session of its own, so
        killing the launcher's process group alone would leave them serving."""
        workers = self.worker_pids().values()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)

    def worker_pids(self) -> dict[int, int]:
        """{rank: pid} of the worker processes still running (read from the processes' environments)."""
        pids = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ranks = [v.removeprefix(b"RANK=") for v in environ if v.startswith(b"RANK=")]
            if b"run_example.py" in cmdline and ranks and "MASTER_PORT=".encode() in b"".join(environ) and \
                    str(self.port).encode() in cmdline:
                pids[int(ranks[0])] = int(entry.name)
        return pids

    def rank_pid(self, rank: int) -> int:
        """The pid of the worker process of `rank`."""
        pid = self.worker_pids().get(rank)
        assert pid is not None, f"no process of rank {rank}"
        return pid


def ask(url: str, request: tuple, stream: bool) -> dict:
    """A request's (kind, text, max_tokens[, JSON schema of the answer, as text]) answer."""
    kind, text, max_tokens, *schema = request
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    name = client.models.list().data[0].id
    if kind == "text":
        fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": json.loads(
            schema[0])}}} if schema else {}
        if stream:
            return {"content": "".join(c.choices[0].text for c in client.completions.create(
                model=name, prompt=text, max_tokens=max_tokens, stream=True, extra_body=fmt) if c.choices)}
        return {"content": client.completions.create(model=name, prompt=text, max_tokens=max_tokens,
                                                     extra_body=fmt).choices[0].text}
    messages = [{"role": "user", "content": text}]
    if stream:
        chunks = [c for c in client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens,
                                                            stream=True) if c.choices]
        return {"content": "".join(c.choices[0].delta.content or "" for c in chunks),
                "reasoning": "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)}
    message = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens).choices[0].message
    return {"content": message.content or "", "reasoning": getattr(message, "reasoning_content", None) or ""}


@pytest.fixture(scope="module")
def one_process(with_tokenizer) -> dict:
    """Every request's answer from the one-process server."""
    model = MiniMaxM2Model.from_pretrained(with_tokenizer, max_seq_len=256)
    engine = Engine(model, max_num_seqs=4)
    engine.start()
    tokenizer = Tokenizer.from_file(str(with_tokenizer / "tokenizer.json"))
    port = free_port()
    server = make_server(ServedModel("m", engine, tokenizer, Sampling(max_new_tokens=8), 256, with_tokenizer),
                         "127.0.0.1", port, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}"
        answers = {(r, stream): ask(url, r, stream) for r in REQUESTS for stream in (False, True)}
        assert all(json.loads(answers[(REQUESTS[-1], stream)]["content"]) for stream in (False, True))
        return answers
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 1, 2), (2, 1, 1), (2, 2, 2), (2, 2, 1), (4, 1, 4), (4, 2, 2),
                                               (4, 2, 4), (4, 1, 2)])
def test_plans_sent_to_every_rank_give_one_process_tokens(float32_checkpoint, world, tp, moe_tp) -> None:
    """Rank 0's engine sends every plan (steps and prefix copies) to the other rank, ranks as threads; requests
    arrive while others run and share a 40-token prefix, greedy, sampled on the device (top-k), sampled on the
    host (no top-k: logits returned) and keeping their logits, two with log-probabilities (from the vocabulary
    slices of every rank): every rank computes what one process does."""
    from thread_ranks import plans_to_every_rank

    from minimax_m2.parallel import ParallelLayout

    shared = list(range(5, 45))
    prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6], [9, 9], shared + [7]]
    settings = [Sampling(max_new_tokens=5, logprobs=3),
                Sampling(max_new_tokens=5, temperature=0.9, top_k=8, top_p=0.9, seed=1),
                Sampling(max_new_tokens=5, temperature=1.1, seed=2), Sampling(max_new_tokens=5),
                Sampling(max_new_tokens=5, temperature=0.7, top_k=3, seed=3, logprobs=2)]

    def arriving(engine: Engine) -> tuple[list[list[int]], list[np.ndarray]]:
        requests = []
        for i, (prompt, sampling) in enumerate(zip(prompts, settings)):
            requests.append(engine.submit(prompt, sampling, keep_logits=i == 3))
            for _ in range(3):
                engine.step()
        while not engine.idle():
            engine.step()
        assert any(r.reused == 40 for r in requests), "no prefix was reused"
        scored = [np.array([[lp] + [v for _, v in top] for lp, top in r.logprobs]) for r in requests]
        return [r.generated for r in requests], scored

    want, want_scored = arriving(Engine(MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=128),
                                        max_num_seqs=4, prefill_chunk=16))
    def load(r: int) -> MiniMaxM2Model:
        return MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=128,
                                              layout=ParallelLayout(world, tp, r, moe_tp=moe_tp))

    def lead(model: MiniMaxM2Model, sender) -> tuple:
        return *arriving(Engine(model, max_num_seqs=4, prefill_chunk=16, executor=sender)), sender.plans

    (got, scored, plans), steps = plans_to_every_rank(world, load, 4, lead)
    assert got == want and all(0 < s == steps[0] < plans for s in steps)
    assert [a.shape for a in scored] == [(5, 4), (0,), (0,), (0,), (5, 3)]
    assert all(np.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(scored, want_scored))


def check_equal(url: str, one_process: dict) -> None:
    with ThreadPoolExecutor(len(REQUESTS)) as pool:  # concurrent: batched by rank 0's engine
        answers = dict(zip(one_process, pool.map(lambda key: ask(url, *key), one_process)))
    assert answers == one_process


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 1, 2), (2, 2, 1)], ids=["experts-sliced", "tp2-experts-spread"])
def test_ranks_answer_as_one_process(with_tokenizer, one_process, world, tp, moe_tp) -> None:
    with RankServer(world, ["--checkpoint", str(with_tokenizer)], "--tp", str(tp), "--moe-tp", str(moe_tp)) as server:
        assert any(f"all {world} ranks loaded and ready" in line for line in server.output)
        check_equal(server.url, one_process)
        plans = _metric(server.url, "plans_total")
        assert plans >= _metric(server.url, "steps_total") > 0 and _metric(server.url, "control_bytes_total") > 0, \
            "the control path's plans and bytes are on /metrics"
        # a client that disconnects mid-stream frees its slot on every rank
        body = json.dumps({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 80,
                           "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received, deadline = b"", time.monotonic() + 30
            while received.count(b"data:") < 3 and time.monotonic() < deadline:
                received += raw.recv(4096)
        deadline = time.monotonic() + 15
        while _metric(server.url, "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metric(server.url, "running") == 0
        check_equal(server.url, {k: v for k, v in one_process.items() if k[0] == REQUESTS[0]})


@pytest.mark.parametrize("world, tp, moe_tp", [(2, 2, 2), (4, 2, 2)], ids=["w2-tp2-sliced", "w4-tp2-mixed"])
def test_prepared_weights_over_ranks(with_tokenizer, one_process, tmp_path, world, tp, moe_tp) -> None:
    out = tmp_path / "prepared"
    done = subprocess.run([sys.executable, str(ROOT / "prepare_weights.py"), str(with_tokenizer), "--out", str(out),
                           "--dtype", "float32", "--ep", str(world), "--tp", str(tp), "--moe-tp", str(moe_tp)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    with RankServer(world, ["--weights", str(out)]) as server:
        assert any(f"all {world} ranks loaded and ready" in line for line in server.output)
        check_equal(server.url, one_process)


def long_stream(url: str):
    """A streamed chat completion of up to 100 tokens whose first chunk has arrived."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
    stream = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=100, stream=True,
                                            messages=[{"role": "user", "content": "a long answer please"}])
    next(iter(stream))
    return stream


def test_a_killed_rank_ends_requests_with_an_error_and_every_process(with_tokenizer) -> None:
    with RankServer(2, ["--checkpoint", str(with_tokenizer)], "--moe-tp", "2") as server:
        stream = long_stream(server.url)
        start = time.monotonic()
        os.kill(server.rank_pid(1), signal.SIGKILL)
        with pytest.raises(Exception):  # noqa: B017 - an error event or a broken connection, as the client sees it
            for chunk in stream:
                pass
        assert server.process.wait(timeout=TIMEOUT + 30) != 0
        assert time.monotonic() - start < TIMEOUT + 30


def living(pids: list[int], deadline: float) -> list[int]:
    """The processes among `pids` still running at `deadline` or once none is (a zombie waiting for its
    reaper has ended)."""
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    while [p for p in pids if running(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if running(p)]


def test_sigterm_to_the_launcher_drains_and_stops_every_rank(with_tokenizer) -> None:
    with RankServer(2, ["--checkpoint", str(with_tokenizer)], "--moe-tp", "2") as server:
        stream = long_stream(server.url)
        pids = [server.rank_pid(0), server.rank_pid(1)]
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        reasons = [c.choices[0].finish_reason for c in stream if c.choices]
        assert reasons[-1] == "abort"
        server.process.wait(timeout=40)
        assert time.monotonic() - start < 40
        assert not living(pids, start + 40), "a rank outlived the launcher"


def test_sigkill_to_the_launcher_stops_every_rank(with_tokenizer) -> None:
    with RankServer(2, ["--checkpoint", str(with_tokenizer)], "--moe-tp", "2") as server:
        stream = long_stream(server.url)
        pids = [server.rank_pid(0), server.rank_pid(1)]
        start = time.monotonic()
        os.kill(server.process.pid, signal.SIGKILL)  # the launcher alone: it can neither stop nor signal the ranks
        reasons = [c.choices[0].finish_reason for c in stream if c.choices]
        assert reasons[-1] == "abort"
        assert not living(pids, start + 40), "a rank outlived its killed launcher"
        assert "the launcher" in "".join(server.output) and "is gone" in "".join(server.output)
