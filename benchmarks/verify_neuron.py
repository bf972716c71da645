"""One command for a Trainium host: the device program on 1, 2 or 64 NeuronCores against the NumPy run.

Compiles the serving engine's whole shape set for a small random model (or for --weights, prepared by
prepare_weights.py for this layout), runs prefill and decode on the NeuronCores, compares tokens and
logits with the same model run by NumPy on this host's CPU (bf16 tolerance), and prints measured TTFT,
TPOT, launches and host-device bytes beside the roofline's projection, as a table and JSON (see
minimax_m2/device/neuron_check.py). Exits 1 when a check fails. Needs nkipy and the Neuron SDK: NOT RUN ON
HARDWARE YET.

  python benchmarks/verify_neuron.py                                            # one NeuronCore
  torchrun --nproc-per-node 2 benchmarks/verify_neuron.py --moe-tp 2
  torchrun --nproc-per-node 64 benchmarks/verify_neuron.py --tp 8 --moe-tp 64 [--weights PREPARED]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimax_m2 import distributed  # noqa: E402
from minimax_m2.device.neuron import NeuronRunner, run_on  # noqa: E402
from minimax_m2.device.neuron_check import check_device, format_report  # noqa: E402
from minimax_m2.model import MiniMaxM2Model  # noqa: E402
from minimax_m2.run import exit_with, random_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="prepared weights for this layout (default: a small random model)")
    p.add_argument("--tp", type=int, default=1, help="attention tensor parallelism")
    p.add_argument("--moe-tp", type=int, help="ranks each expert is sliced over (default: all)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="random model's dtype")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-experts", type=int, default=64)
    p.add_argument("--experts-per-token", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="KV-cache slots per attention group, and the batch timed")
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--tolerance", type=float, help="max |logit difference| / max |logit| (bf16: 2e-2, float32: 1e-4)")
    p.add_argument("--build-dir", default="build/neuron")
    p.add_argument("--collective-timeout", type=float, default=600.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    runner = NeuronRunner(args.build_dir, distributed.rank())
    layout, _ = distributed.start(args.tp, args.collective_timeout, moe_tp=args.moe_tp or distributed.world_size())
    if args.weights:
        def load() -> MiniMaxM2Model:
            return MiniMaxM2Model.from_prepared(args.weights, max_seq_len=args.max_seq_len, layout=layout)
    else:
        config = random_config(args.hidden_size, args.num_layers, args.num_experts, args.experts_per_token,
                               args.vocab_size)

        def load() -> MiniMaxM2Model:
            return MiniMaxM2Model.random(config, max_seq_len=args.max_seq_len, layout=layout, dtype=args.dtype)
    cpu, device = load(), run_on(load(), runner)
    tolerance = args.tolerance or (2e-2 if str(device.dtype) == "bfloat16" else 1e-4)
    report = check_device(cpu, device, runner, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          batch=args.batch, prefill_chunk=args.prefill_chunk, tolerance=tolerance)
    if layout.rank == 0:
        print(f"{layout.world} NeuronCores (tp {layout.tp}, moe_tp {layout.moe_tp}), {device.dtype}, "
              f"{device.config.num_hidden_layers} layers")
        print(format_report(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
            print(f"wrote {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    exit_with(main)
