"""The OpenAI server under load: concurrent streaming clients with the official `openai` client.

Starts `run_example.py --mode serve` on the medium random config (hidden 1024, 8 layers, 64 experts
top-8; its checkpoint written by transformers, with a word-level tokenizer of its 32000 ids: `w<id>`
is one token, so prompt lengths are exact) or on --checkpoint, and runs, in one run:

1. concurrency: --clients streaming clients, each sending its share of a seeded mix of prompt and output
   lengths, against the engine with --max-num-seqs 16 and with --max-num-seqs 1 (one at a time), for two
   mixes: short answers (--requests requests of 32-256 prompt and 16-64 new tokens: about 3.6 prompt
   tokens per output token) and reasoning-length answers (one request per client, 32-256 prompt and
   128-256 new tokens: MiniMax-M2 thinks before it answers); with where the time went (prefill and decode
   steps, from /metrics) and what that bounds; then 16 clients decoding together with no prompt arriving,
   beside one client: the decode step's own TPOT ratio, and its floor here (one row's step plus the
   expert reads the other rows add, at this machine's best time per expert read);
2. chunked prefill: decoding clients while 512-token prompts keep arriving: inter-token latency p50/p99,
   with the default --prefill-chunk 256 and with 32;
3. prefix reuse: a conversation's second turn (about 1000 tokens of history) with and without reuse;
4. the Trainium projection of serving throughput at 32 and 256 concurrent requests (roofline, best
   layout), beside NxDI's measured 128.9 tok/s at 256 users;
5. with --nproc W [W ...]: the concurrency mix served by W ranks (torchrun, rank 0 schedules and
   broadcasts each step's plan): output tok/s, the step time beside the control path's time and bytes
   per plan (from /metrics), and the bytes each rank reads per decode step (from the recorded program:
   what carries over to NeuronCores; on this machine the W processes share its cores).

Reports TTFT, TPOT (per request: time between its first and last token over its tokens after the first)
and inter-token latency at p50, p90, p99, output tok/s and requests/s, as tables and JSON.

  python benchmarks/bench_serving.py [--clients 16] [--requests 32] [--nproc 1 2 4] [--json serving.json]
                                     [--checkpoint DIR]
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import table  # noqa: E402
from benchmarks.expert_floor import expert_read_ms, step_floor  # noqa: E402
from benchmarks.medium_config import MEDIUM  # noqa: E402

NXDI_TOK_S_AT_256 = 128.9
CHUNKS = (256, 32)  # the default prefill chunk, and one whose prefill costs about a decode step here


def medium_checkpoint(path: Path) -> Path:
    """The medium random model (transformers writes it) and a word-level tokenizer of its vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    torch.manual_seed(0)
    MiniMaxM2ForCausalLM(MiniMaxM2Config(**MEDIUM)).save_pretrained(path)
    vocab = {f"w{i}": i for i in range(MEDIUM["vocab_size"] - 1)}
    vocab["[UNK]"] = MEDIUM["vocab_size"] - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return path


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, MEDIUM["vocab_size"] - 1, n))


class Server:
    """run_example.py --mode serve on a free 127.0.0.1 port (under torchrun with `ranks` > 1), stopped
    (SIGTERM) on exit."""

    def __init__(self, checkpoint: Path, *flags: str, ranks: int = 1):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", str(ranks)]
        self.process = subprocess.Popen([*launch, str(ROOT / "run_example.py"), "--mode", "serve", "--ep", str(ranks),
                                         "--checkpoint", str(checkpoint), "--port", str(self.port), *flags],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                                        start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5):
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start within 600 s")

    def __exit__(self, *_) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/metrics", timeout=10) as reply:
            lines = reply.read().decode().splitlines()
        return {line.split()[0].removeprefix("minimax_m2_").removesuffix("_total"): float(line.split()[1])
                for line in lines if line.startswith("minimax_m2_")}


def stream(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed completion -> submit, first-token and per-token times."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", timeout=3600, max_retries=0)
    start, times = time.perf_counter(), []
    for chunk in client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=max_tokens,
                                           stream=True):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    return {"start": start, "times": times}


def complete(url: str, prompt: str, max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", timeout=3600, max_retries=0)
    return client.completions.create(model=client.models.list().data[0].id, prompt=prompt,
                                     max_tokens=max_tokens).choices[0].text


def run_clients(url: str, jobs: list[list[tuple[str, int]]]) -> tuple[list[dict], float]:
    """Each client (a thread) sends its jobs one after another -> every request's record, wall seconds."""
    records: list[dict] = []
    lock = threading.Lock()

    def client(mine: list[tuple[str, int]]) -> None:
        for prompt, max_tokens in mine:
            record = stream(url, prompt, max_tokens)
            with lock:
                records.append(record)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


def summarise(records: list[dict], seconds: float) -> dict:
    def pct(values: list[float]) -> dict:
        return {f"p{p}": float(np.percentile(values, p)) * 1e3 for p in (50, 90, 99)} if values else {}

    ttft = [r["times"][0] - r["start"] for r in records if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in records if len(r["times"]) > 1]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in records)
    return {"requests": len(records), "output_tokens": tokens, "seconds": seconds, "output_tok_s": tokens / seconds,
            "requests_s": len(records) / seconds, "ttft_ms": pct(ttft), "tpot_ms": pct(tpot), "itl_ms": pct(itl)}


def show(name: str, s: dict) -> None:
    def fmt(d: dict) -> str:
        return " / ".join(f"{d[k]:.0f}" for k in ("p50", "p90", "p99")) if d else "-"

    table.row(name, s["requests"], f"{s['output_tok_s']:.1f}", f"{s['requests_s']:.2f}", fmt(s["ttft_ms"]),
              fmt(s["tpot_ms"]), fmt(s["itl_ms"]))


def served(checkpoint: Path, flags: list[str], jobs: list[list[tuple[str, int]]], warm_up: str) -> dict:
    """The jobs' summary on a server started with these flags, with the time its engine spent in prefill
    and in decode steps while serving them (from /metrics, the warm-up request left out)."""
    with Server(checkpoint, *flags) as server:
        stream(server.url, warm_up, 2)  # the first request pays for the schedules' measurement
        before = server.metrics()
        summary = summarise(*run_clients(server.url, jobs))
        after = server.metrics()
    spent = {k: after[k] - before[k] for k in ("prefill_seconds", "decode_seconds", "prefill_steps", "decode_steps")}
    return {**summary, **spent, "decode_ms_per_step": spent["decode_seconds"] / max(spent["decode_steps"], 1) * 1e3}


def rank_bytes_per_step(checkpoint: Path, ranks: int, rows: int, context: int) -> float:
    """Bytes one rank reads in a decode step of `rows` rows at the layout the server chooses for `ranks`
    (the recorded program's weights and KV cache, float32 as served here)."""
    from minimax_m2.config import MiniMaxM2Config
    from minimax_m2.device.roofline import fastest_moe_tp, record_units
    from minimax_m2.parallel import ParallelLayout

    config = MiniMaxM2Config.from_pretrained(checkpoint)
    moe_tp = fastest_moe_tp(config, ranks, 1, rows, context, config.num_local_experts)
    costs = record_units(config, ParallelLayout(ranks, 1, 0, moe_tp=moe_tp), phase="decode", batch=rows, seq=1,
                         context=context, dtype=np.dtype(np.float32))
    return costs[0].bytes_read + config.num_hidden_layers * costs[1].bytes_read + costs[2].bytes_read


def serve_over_ranks(checkpoint: Path, context: list[str], jobs: list, nproc: list[int]) -> list[dict]:
    """The concurrency mix served by each number of ranks, with the control path's overhead."""
    rows = []
    print()
    table.header("ranks", "output tok/s", "TPOT ms p50", "step ms", "control ms per plan", "control bytes per plan",
                 "MB read per rank per decode step (16 rows)")
    for ranks in nproc:
        with Server(checkpoint, *context, "--max-num-seqs", "16", ranks=ranks) as server:
            stream(server.url, "w1 w2 w3", 2)
            summary = summarise(*run_clients(server.url, jobs))
            m = server.metrics()
        plans = m.get("plans", 0) or 1
        row = {"ranks": ranks, **summary, "step_ms": m["step_seconds"] / m["steps"] * 1e3,
               "control_ms_per_plan": m.get("control_seconds", 0.0) / plans * 1e3,
               "control_bytes_per_plan": m.get("control_bytes", 0.0) / plans,
               "rank_mb_per_decode_step": rank_bytes_per_step(checkpoint, ranks, 16, int(context[-1])) / 1e6}
        rows.append(row)
        table.row(ranks, f"{row['output_tok_s']:.1f}", f"{row['tpot_ms']['p50']:.0f}", f"{row['step_ms']:.1f}",
                  f"{row['control_ms_per_plan']:.2f}", f"{row['control_bytes_per_plan']:.0f}",
                  f"{row['rank_mb_per_decode_step']:.1f}")
    print(f"(this machine has {os.cpu_count()} cores: W ranks share them, so step times over W > 1 ranks are not "
          "what W devices would take; the bytes each rank reads are)")
    return rows


def trainium_projection() -> list[dict]:
    """Output tok/s at 32 and 256 concurrent requests on trn2.48xlarge (64 ranks, tp 8), best layout of the
    roofline: batch / TPOT."""
    from minimax_m2.config import MiniMaxM2Config
    from minimax_m2.device.roofline import TRN2, record_units, served_seconds
    from minimax_m2.parallel import ParallelLayout

    config, rows = MiniMaxM2Config(), []
    for batch in (32, 256):
        best = min((served_seconds(record_units(config, ParallelLayout(64, 8, 0, moe_tp=m), phase="decode",
                                                batch=batch, seq=1, context=4096), config.num_hidden_layers, TRN2,
                                   "decode", batch), m)
                   for m in (1, 8, 64))
        rows.append({"batch": batch, "moe_tp": best[1], "tpot_ms": best[0] * 1e3, "output_tok_s": batch / best[0]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="serve this checkpoint (with tokenizer.json) instead")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=32, help="requests in the concurrency mix")
    p.add_argument("--nproc", type=int, nargs="+", default=[], help="also serve the mix over each number of ranks")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    results: dict = {"cpu_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or medium_checkpoint(Path(tmp))
        context = ["--max-seq-len", "2048"]
        mixes = {name: [(words(rng, int(rng.integers(32, 257))), int(rng.integers(*new))) for _ in range(count)]
                 for name, new, count in (("short answers", (16, 65), args.requests),
                                          ("reasoning-length answers", (128, 257), args.clients))}
        jobs = {name: [mix[i :: args.clients] for i in range(args.clients)] for name, mix in mixes.items()}
        print(f"{args.clients} clients, greedy; short answers: {args.requests} requests of 32-256 prompt and 16-64 new "
              f"tokens; reasoning-length answers: {args.clients} requests of 32-256 prompt and 128-256 new tokens; "
              "this machine has 2 cores, shared by the server and the clients\n")
        table.header("run", "requests", "output tok/s", "requests/s", "TTFT ms p50/p90/p99", "TPOT ms", "ITL ms")
        for mix_name in mixes:
            for seqs in (16, 1):
                name = f"{mix_name}, max-num-seqs {seqs}"
                results[name] = served(checkpoint, [*context, "--max-num-seqs", str(seqs)], jobs[mix_name],
                                       warm_up=words(rng, 8))
                show(name, results[name])
        decoders = [[(words(rng, 32), 64)] for _ in range(args.clients)]
        with Server(checkpoint, *context, "--max-num-seqs", "16") as server:
            single = summarise(*run_clients(server.url, [[(words(rng, 64), 48)] * 2]))
            show("one client", single)
            together = summarise(*run_clients(server.url, decoders))
            show(f"{args.clients} clients decoding, no prompt arriving", together)
        results["one client"], results["decoding together"] = single, together
        for chunk in CHUNKS:
            with Server(checkpoint, *context, "--max-num-seqs", "16", "--prefill-chunk", str(chunk)) as server:
                decoders = [[(words(rng, 32), 96)] for _ in range(6)]
                arriving = [[(words(rng, 512), 4) for _ in range(4)]]
                records, seconds = run_clients(server.url, decoders + arriving)
                chunked = summarise([r for r in records if len(r["times"]) > 4], seconds)  # the decoding clients
                show(f"decoding while 512-token prompts arrive, --prefill-chunk {chunk}", chunked)
                results[f"chunked prefill {chunk}"] = chunked
        turns = {}
        for name, flags in (("with prefix reuse", []), ("without prefix reuse", ["--no-prefix-reuse"])):
            with Server(checkpoint, *context, "--max-num-seqs", "4", *flags) as server:
                first = words(np.random.default_rng(1), 1000)
                second = f"{first} {complete(server.url, first, 8)} {words(np.random.default_rng(2), 20)}"
                turns[name] = summarise([stream(server.url, second, 8)], 1.0)["ttft_ms"]["p50"]
        results["second turn ttft ms"] = turns
        if args.nproc:
            results["ranks"] = serve_over_ranks(checkpoint, context, jobs["short answers"], args.nproc)
        reused, cold = turns["with prefix reuse"], turns["without prefix reuse"]
        print(f"\nsecond turn of a ~1000-token conversation, TTFT: {reused:.0f} ms with prefix reuse, "
              f"{cold:.0f} ms without ({reused / cold:.2f}x)")
    print()
    for mix_name in mixes:
        one, many = results[f"{mix_name}, max-num-seqs 1"], results[f"{mix_name}, max-num-seqs 16"]
        print(f"{mix_name}: {args.clients} clients give {many['output_tok_s'] / one['output_tok_s']:.2f}x the output "
              f"tok/s of one at a time, p50 TPOT {many['tpot_ms']['p50'] / single['tpot_ms']['p50']:.2f}x one "
              f"client's; time in prefill steps {many['prefill_seconds']:.1f} s of {many['seconds']:.1f} s (one at a "
              f"time: {one['prefill_seconds']:.1f} s of {one['seconds']:.1f} s), decode steps "
              f"{many['decode_ms_per_step']:.0f} ms each (one at a time: {one['decode_ms_per_step']:.0f} ms): "
              f"with decode steps free, at most {one['seconds'] / many['prefill_seconds']:.2f}x")
    print(f"{args.clients} clients decoding with no prompt arriving: p50 TPOT "
          f"{together['tpot_ms']['p50'] / single['tpot_ms']['p50']:.2f}x one client's (the decode step's own cost)")
    floor = step_floor(single["tpot_ms"]["p50"], 1, args.clients, expert_read_ms())
    results["decode floor"] = floor
    print(f"the floor of that ratio on this machine: {args.clients} rows read {floor['distinct_experts']:.1f} distinct "
          f"experts per layer where one row reads {MEDIUM['num_experts_per_tok']}, and reading one takes at best "
          f"{floor['expert_read_ms']:.3f} ms here, so their step costs at least one client's TPOT plus the "
          f"{MEDIUM['num_hidden_layers']} layers' extra reads: {floor['ms']:.0f} ms, {floor['ratio']:.2f}x")
    print("p99/p50 inter-token latency while prompts arrive " + ", ".join(
        f"{r['itl_ms']['p99'] / r['itl_ms']['p50']:.2f}x (--prefill-chunk {c})"
        for c, r in ((c, results[f"chunked prefill {c}"]) for c in CHUNKS)))
    projection = trainium_projection()
    results["trainium"] = projection
    print("\nTrainium projection (trn2.48xlarge, 64 ranks, tp 8, roofline of minimax_m2/device/roofline.py):")
    for row in projection:
        print(f"  {row['batch']} concurrent: {row['output_tok_s']:.0f} output tok/s (TPOT {row['tpot_ms']:.2f} ms, "
              f"moe_tp {row['moe_tp']}); NxDI measured {NXDI_TOK_S_AT_256} tok/s at 256 users")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
