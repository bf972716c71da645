"""Structured output's cost: the decode step of 16 constrained requests beside the same 16 unconstrained.

The medium random config (hidden 1024, 8 layers, 64 experts top-8, vocabulary 32000) with a byte-level BPE
tokenizer of 32000 tokens trained here on this environment's Python sources (so that llguidance's masks
cost what they cost over a real vocabulary). 16 requests decode together, each held to a JSON schema (an
array of at least 256 strings: an answer that stays open, so that every step is a step of 16 constrained rows) or
free, in alternating rounds (this machine is shared and noisy: the ratio is taken round by round). Prints
the mean decode step time of each, their ratio, the grammar engine's mask time per step (computed on its
own thread while the step's layers run), and the bytes a constrained row adds to a step: to the plan rank
0 broadcasts (the whole vocabulary's bits, V / 8) and to each rank's device (its vocabulary slice's words,
as the NeuronCore runner's stand-ins count them), here and for the real config over 64 ranks.

  python benchmarks/bench_structured.py [--rounds 3] [--tokens 48] [--json structured.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.medium_config import MEDIUM  # noqa: E402
from minimax_m2 import MiniMaxM2Model  # noqa: E402
from minimax_m2.config import MiniMaxM2Config  # noqa: E402
from minimax_m2.device.step import mask_words  # noqa: E402
from minimax_m2.generation import Sampling  # noqa: E402
from minimax_m2.serving import grammars  # noqa: E402
from minimax_m2.serving.constraint import Grammars  # noqa: E402
from minimax_m2.serving.engine import Engine  # noqa: E402

ROWS = 16
REAL_VOCAB, REAL_RANKS = 200064, 64


def bpe_tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on this environment's Python sources."""
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    files = sorted(str(p) for p in Path(os.path.dirname(json.__file__)).parent.rglob("*.py"))[:400]
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train(files, trainer)
    return tokenizer


def decode_step_seconds(engine: Engine, prompts: list[list[int]], sampling: Sampling, constraints) -> list[float]:
    """Each decode step's seconds while all the requests decode together (no prefill in the step)."""
    requests = [engine.submit(p, sampling, constraint=c) for p, c in zip(prompts, constraints)]
    times = []
    while not engine.idle():
        decoding = sum(r.decoding for r in requests) == len(requests)
        before = engine.stats["decode_seconds"], engine.stats["prefill_steps"]
        engine.step()
        if decoding and engine.stats["prefill_steps"] == before[1]:
            times.append(engine.stats["decode_seconds"] - before[0])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    config = MiniMaxM2Config.from_dict(MEDIUM)
    tokenizer = bpe_tokenizer(config.vocab_size)
    model = MiniMaxM2Model.random(config, seed=0, max_seq_len=512)
    held = Grammars(tokenizer, config.vocab_size, ())
    matcher = held.compile(grammars.json_answer({"type": "array", "items": {"type": "string"}, "minItems": 256}))
    engine = Engine(model, max_num_seqs=ROWS, prefill_chunk=256)
    engine.warm_up(every_shape=False)
    prompts = [tokenizer.encode(f"Request {i}: list some names as JSON.").ids for i in range(ROWS)]
    sampling = Sampling(max_new_tokens=args.tokens, temperature=0.8, top_k=40, seed=1)
    free, held_steps = [], []
    for _ in range(args.rounds):
        free += decode_step_seconds(engine, prompts, sampling, [None] * ROWS)
        held_steps += decode_step_seconds(engine, prompts, sampling,
                                          [held.constraint(matcher, False) for _ in range(ROWS)])
    masks = held.stats
    ratio = statistics.mean(held_steps) / statistics.mean(free)
    mask_ms = 1e3 * masks["mask_seconds"] / masks["masked_steps"]
    row_bytes = {"plan (rank 0 to every rank), here": mask_words(config.vocab_size) * 4,
                 "device, here (1 rank)": mask_words(config.vocab_size) * 4,
                 "plan, real vocabulary": mask_words(REAL_VOCAB) * 4,
                 f"device, real vocabulary over {REAL_RANKS} ranks (per rank)":
                     mask_words(-(-REAL_VOCAB // REAL_RANKS)) * 4}
    print(f"medium config, {ROWS} requests decoding together, {args.rounds} alternating rounds, "
          f"{args.tokens} new tokens each")
    print(f"  decode step, unconstrained: {1e3 * statistics.mean(free):8.2f} ms  ({len(free)} steps)")
    print(f"  decode step, constrained:   {1e3 * statistics.mean(held_steps):8.2f} ms  ({len(held_steps)} steps)")
    print(f"  ratio constrained / unconstrained: {ratio:.3f}x  (target at most 1.15x)")
    print(f"  mask time per step ({ROWS} rows, llguidance over {config.vocab_size} tokens, off the engine thread): "
          f"{mask_ms:.2f} ms ({1e3 * mask_ms / ROWS:.0f} us a row)")
    print("  bytes a constrained row adds to a step:")
    for where, count in row_bytes.items():
        print(f"    {where:58s} {count:7d}")
    if args.json:
        args.json.write_text(json.dumps({"rows": ROWS, "free_ms": 1e3 * statistics.mean(free),
                                         "constrained_ms": 1e3 * statistics.mean(held_steps), "ratio": ratio,
                                         "mask_ms_per_step": mask_ms, "row_bytes": row_bytes}, indent=1))


if __name__ == "__main__":
    main()
