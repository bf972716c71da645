"""MiniMax-M2 on NumPy/nkipy kernels: kernel self-checks, a random-weight model, or a real checkpoint.

  python run_example.py --mode test
  python run_example.py --mode random --num-layers 4 --num-experts 16 --max-new-tokens 16
  python run_example.py --mode generate --checkpoint DIR --prompt-ids 1,2,3 --experts 0,1,2,3,4,5,6,7
  torchrun --nproc-per-node 4 run_example.py --mode generate --checkpoint DIR --prompt-ids 1,2,3 --ep 4 --tp 2
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from minimax_m2 import MiniMaxM2Config, MiniMaxM2Model
from minimax_m2.distributed import CollectiveError, start, world_size
from minimax_m2.prepare import prepared_layout
from minimax_m2.roofline import fastest_moe_tp
from minimax_m2.run import (
    Sampling,
    kernel_checks,
    load_tokenizer,
    parse_ids,
    random_config,
    report,
    report_parallel,
    run_kernel_checks,
    timed_generate,
    write_outputs,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["test", "random", "generate"], default="random")
    p.add_argument("--checkpoint", type=Path, help="HF checkpoint directory or cache snapshot (generate mode)")
    p.add_argument("--weights", type=Path, help="directory written by prepare_weights.py (generate mode, instead of "
                                                "--checkpoint; its layout is this run's)")
    p.add_argument("--prompt-ids", action="append", help="comma-separated token ids; repeat for a batch (random mode: instead of a random prompt)")
    p.add_argument("--prompt", help="prompt text (needs tokenizer.json in the checkpoint and `tokenizers`)")
    p.add_argument("--experts", help="comma-separated expert ids to load (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights, activations and KV cache (bfloat16 as on a NeuronCore; router and logits stay float32)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", type=Path)
    p.add_argument("--dump-logits", type=Path)
    parallel = p.add_argument_group("several ranks (launch with torchrun --nproc-per-node W)")
    parallel.add_argument("--ep", type=int, default=1, help="ranks W: experts spread over all of them (= torchrun's W)")
    parallel.add_argument("--tp", type=int, default=1, help="ranks per attention group, splitting heads (divides 8 KV heads)")
    parallel.add_argument("--moe-tp", type=int,
                          help="ranks each expert's intermediate dimension is sliced over (1: whole experts spread over "
                               "all ranks; W: every expert sliced over all ranks; moe_tp x moe_ep = W). Default: the "
                               "layout the trn2 roofline projection says decodes this batch fastest")
    parallel.add_argument("--capacity-factor", type=float,
                          help="send-buffer rows per rank as a multiple of the even share; pairs over it are dropped "
                               "and counted (default: worst-case capacity, nothing dropped)")
    parallel.add_argument("--collective-timeout", type=float, default=600.0, help="seconds a rank waits for the others")
    random = p.add_argument_group("random mode")
    random.add_argument("--num-layers", type=int, default=4)
    random.add_argument("--num-experts", type=int, default=16)
    random.add_argument("--experts-per-token", type=int, default=4)
    random.add_argument("--hidden-size", type=int, default=256)
    random.add_argument("--vocab-size", type=int, default=1024)
    random.add_argument("--batch", type=int, default=1)
    random.add_argument("--prompt-len", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.mode == "test":
        import test_kernels

        return 0 if run_kernel_checks(kernel_checks(test_kernels)) else 1

    if world_size() != args.ep:
        raise ValueError(f"--ep {args.ep} but {world_size()} ranks are running: launch with torchrun --nproc-per-node {args.ep}")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    experts = [int(e) for e in args.experts.split(",")] if args.experts else None
    decode_text, prepared = None, None
    if args.mode == "random":
        config = random_config(args.hidden_size, args.num_layers, args.num_experts, args.experts_per_token, args.vocab_size)
        if args.prompt_ids:
            prompt = parse_ids(args.prompt_ids)
        else:
            prompt = np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.prompt_len))
    else:
        if (args.checkpoint is None) == (args.weights is None):
            raise ValueError("--mode generate needs --checkpoint DIR or --weights DIR (one of them)")
        prepared = prepared_layout(args.weights) if args.weights else None
        config = prepared[0] if prepared else MiniMaxM2Config.from_pretrained(args.checkpoint)
        if args.prompt:
            tokenizer = load_tokenizer(args.checkpoint or args.weights)
            prompt = np.array([tokenizer.encode(args.prompt).ids], dtype=np.int64)
            decode_text = tokenizer.decode
        elif args.prompt_ids:
            prompt = parse_ids(args.prompt_ids)
        else:
            raise SystemExit("--mode generate needs --prompt-ids or --prompt")
    if prepared:
        tp, moe_tp = prepared[1]["tp"], prepared[1]["moe_tp"]
    else:
        tp = args.tp
        moe_tp = args.moe_tp or fastest_moe_tp(config, args.ep, tp, len(prompt), args.max_seq_len,
                                               len(experts) if experts else config.num_local_experts)
    layout, backend = start(tp, args.collective_timeout, args.capacity_factor, moe_tp)
    leader = layout.rank == 0
    if args.mode == "random":
        model = MiniMaxM2Model.random(config, seed=args.seed, experts=experts, max_seq_len=args.max_seq_len, layout=layout,
                                      dtype=args.dtype)
        if leader:
            print(f"random MiniMax-M2: {config}")
    elif args.weights:
        model = MiniMaxM2Model.from_prepared(args.weights, max_seq_len=args.max_seq_len, layout=layout)
    else:
        model = MiniMaxM2Model.from_pretrained(args.checkpoint, experts=experts, max_seq_len=args.max_seq_len, layout=layout,
                                               dtype=args.dtype)
    result = timed_generate(model, prompt, sampling, keep_logits=args.dump_logits is not None)
    if leader:
        report(result, decode_text)
        if layout.world > 1:
            report_parallel(model, backend)
        write_outputs(result, args.output_json, args.dump_logits)
    if backend:
        backend.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except CollectiveError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
