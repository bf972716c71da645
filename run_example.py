"""MiniMax-M2 on NumPy/nkipy kernels: kernel self-checks, a random-weight model, or a real checkpoint.

  python run_example.py --mode test
  python run_example.py --mode random --num-layers 4 --num-experts 16 --max-new-tokens 16
  python run_example.py --mode generate --checkpoint DIR --prompt-ids 1,2,3 --experts 0-7
  python run_example.py --mode generate --checkpoint DIR --chat "system: Be brief." --chat "Hello!"
  python run_example.py --mode serve --checkpoint DIR --port 8000        # OpenAI-compatible /v1 endpoints
  python run_example.py --mode plan --config real --ep 64 --tp 8 --device neuron --max-seq-len 196608  # will it fit?
  python run_example.py --mode compile --config real --ep 64 --tp 8 --build-dir build/neuron  # compile ahead of time
  torchrun --nproc-per-node 4 run_example.py --mode generate --checkpoint DIR --prompt-ids 1,2,3 --ep 4 --tp 2
  torchrun --nproc-per-node 64 run_example.py --mode generate --weights PREPARED --prompt "Hi" --ep 64 --device neuron
"""

import argparse
import os
import sys
from pathlib import Path

from minimax_m2.cli import main
from minimax_m2.run import exit_with
from minimax_m2.serving.engine import SPREAD_FROM


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--mode", choices=["test", "random", "generate", "serve", "plan", "compile"], default="random",
                   help="test: kernel self-checks; random: a random-weight model; generate: a checkpoint; "
                        "serve: an OpenAI-compatible server for a checkpoint; plan: the memory plan and compile set "
                        "of a run, loading no weights (exit 2 when it does not fit); compile: every program of "
                        "that run compiled into --build-dir ahead of time (a host with the Neuron compiler, no "
                        "NeuronCore needed), so that a NeuronCore host only loads them" + d)
    p.add_argument("--config", choices=["real"],
                   help="plan mode: the released MiniMax-M2's shapes (instead of --checkpoint, --weights or the "
                        "random-mode flags)")
    p.add_argument("--checkpoint", type=Path, help="HF checkpoint directory or cache snapshot (generate mode)")
    p.add_argument("--weights", type=Path, help="directory written by prepare_weights.py (generate mode, instead of "
                                                "--checkpoint; its layout is this run's)")
    p.add_argument("--prompt-ids", action="append",
                   help="comma-separated token ids; repeat for several prompts, of any lengths, batched by the engine "
                        "(random mode: instead of random prompts)")
    p.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint and `tokenizers`)")
    p.add_argument("--chat", action="append", help="a chat turn, repeatable: 'system: ...' for the system prompt, "
                                                   "anything else a user turn; formatted as MiniMax-M2's chat")
    p.add_argument("--experts", help="expert ids and ranges to load, like 0-7 or 0,3,5 (default: all)")
    p.add_argument("--no-verify", action="store_true",
                   help="with --weights, skip the CRC32 check of every prepared tensor against manifest.json (it reads "
                        "each rank's file once, about 0.3 s per GB on one core here; names, dtypes, shapes, the rank, "
                        "layout and config are checked either way)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per row" + d)
    p.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length: prompt + new tokens" + d)
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="weights, activations and KV cache; router and logits stay float32 (default: float32 on cpu, "
                        "bfloat16 on neuron)")
    p.add_argument("--fp8", choices=["keep", "dequantize"],
                   help="an FP8 checkpoint's float8 experts: kept as 8-bit codes and block scales, decoded exactly "
                        "inside the units (half their bytes: a larger KV pool, but decoding work that the roofline "
                        "projects slower than reading bf16), or dequantised when loaded, as its attention "
                        "projections always are (default: dequantize)")
    p.add_argument("--device", choices=["cpu", "neuron"], default="cpu",
                   help="cpu: the units run as NumPy here; neuron: compiled by nkipy for this rank's NeuronCore "
                        "(Trainium hosts; not yet run on hardware)" + d)
    p.add_argument("--build-dir", type=Path, default=Path("build/neuron"),
                   help="where --device neuron keeps compiled units" + d)
    p.add_argument("--compile-jobs", type=int, default=max(1, (os.cpu_count() or 1) // 4),
                   help="--mode compile: programs compiled at once, each by its own process running the Neuron "
                        "compiler (lower it if the host runs short of memory)" + d)
    p.add_argument("--temperature", type=float, help="0 is greedy (default: generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely (default: generation_config.json)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: generation_config.json)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed" + d)
    p.add_argument("--output-json", type=Path, help="write {prompt_ids, generated_ids} here")
    p.add_argument("--dump-logits", type=Path, help="write float32 logits [batch, positions, vocab] here (.npy)")
    engine = p.add_argument_group("engine (generate and serve mode)")
    engine.add_argument("--max-num-seqs", type=int,
                        help="requests decoded together per attention group (default: the number of prompts in "
                             "generate mode, 8 in serve mode)")
    engine.add_argument("--kv-blocks", type=int,
                        help="the KV cache's blocks of 128 positions per attention group, shared by every request "
                             "(default: on a NeuronCore all the memory the weights and the largest step leave; on a "
                             "CPU --max-num-seqs whole contexts, or what the memory left holds)")
    engine.add_argument("--no-prefix-reuse", action="store_true",
                        help="prefill every prompt cold instead of reusing the cached keys and values of a prefix "
                             "(the previous turn of a conversation, a shared system prompt)")
    engine.add_argument("--speculative", choices=["ngram"],
                        help="verify draft tokens in each decode step: 'ngram' drafts what followed the latest earlier "
                             "occurrence of the last 2 to 4 tokens in the request's prompt and output (exactly the "
                             "tokens of plain decoding; off while 16 or more requests decode)")
    engine.add_argument("--num-speculative-tokens", type=int, default=4,
                        help="draft tokens verified per request and step, at most (adapts to what it accepts)" + d)
    engine.add_argument("--spread-from", type=int, default=SPREAD_FROM,
                        help="with several attention groups (--ep / --tp above 1), a request whose context reaches "
                             "this many tokens has its KV cache spread over all of them: its prefill takes a chunk "
                             "a group per step and every group attends against its share (context parallelism; "
                             "0: never)" + d)
    engine.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompt tokens prefilled per step, all requests together: a long prompt delays the "
                             "running decodes by at most one chunk" + d)
    server = p.add_argument_group("serve mode")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on" + d)
    server.add_argument("--port", type=int, default=8000, help="port to listen on" + d)
    server.add_argument("--served-model-name", help="model id clients use (default: the checkpoint directory's name)")
    server.add_argument("--max-request-bytes", type=int, default=8 << 20,
                        help="largest request body accepted; larger ones get a 413" + d)
    parallel = p.add_argument_group("several ranks (launch with torchrun --nproc-per-node W)")
    parallel.add_argument("--ep", type=int, default=1, help="ranks W (= torchrun's process count)" + d)
    parallel.add_argument("--tp", type=int, default=1,
                          help="ranks per attention group, splitting heads (divides 8 KV heads)" + d)
    parallel.add_argument("--moe-tp", type=int,
                          help="ranks each expert's intermediate dimension is sliced over (1: whole experts spread "
                               "over all ranks; W: every expert sliced over all ranks; moe_tp x moe_ep = W). Default: "
                               "the layout the trn2 roofline projection says decodes this batch fastest")
    parallel.add_argument("--capacity-factor", type=float,
                          help="send-buffer rows per rank as a multiple of the even share; pairs over it are dropped "
                               "and counted (default: worst-case capacity, nothing dropped)")
    parallel.add_argument("--collective-timeout", type=float, default=600.0,
                          help="seconds a rank waits for the others" + d)
    random = p.add_argument_group("random mode")
    random.add_argument("--num-layers", type=int, default=4, help="decoder layers" + d)
    random.add_argument("--num-experts", type=int, default=16, help="experts per layer" + d)
    random.add_argument("--experts-per-token", type=int, default=4, help="top-k experts per token" + d)
    random.add_argument("--hidden-size", type=int, default=256, help="hidden size, a multiple of 128" + d)
    random.add_argument("--vocab-size", type=int, default=1024, help="vocabulary size" + d)
    random.add_argument("--batch", type=int, default=1, help="random prompts in the batch" + d)
    random.add_argument("--prompt-len", type=int, default=16, help="tokens per random prompt" + d)
    random.add_argument("--model-seed", type=int, default=0, help="seed of the random weights and prompt" + d)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    exit_with(lambda: main(parse_args(sys.argv[1:])))
