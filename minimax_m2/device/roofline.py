"""A roofline projection of the declared device program.

Each unit of `minimax_m2.device.program` is recorded (nkipy's emulated semantics, matmuls sized not
computed, zero weights of one rank's shapes) and costed from what it reads, computes and exchanges:

    unit time = max(bytes read / memory bandwidth, matmul FLOPs / matmul rate)
              + recorded ops x per-op overhead
              + sum over its collectives of (latency + bytes on the wire / link bandwidth)

with bytes read = weights and KV cache slices the matmuls read. The max assumes weight reads overlap
the matmuls (a NeuronCore's DMA queues prefetch while its engines compute); hardware that does one
then the other (a CPU thread in BLAS, measured by benchmarks/bench_expert_parallel.py) adds them.
Collectives are not overlapped with compute (a conservative choice). TTFT = embedding + layers x
prefill layer + lm_head; TPOT the same with the decode layer.
"""

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from kernels import collectives, rope_tables
from minimax_m2.config import MiniMaxM2Config
from minimax_m2.device.expert_schedule import ExpertCost, roofline_cost
from minimax_m2.device.nkipy_semantics import Collective, EmulatedCollectives, LoopbackCollectives, Program, trace_unit
from minimax_m2.device.program import Unit, program_units
from minimax_m2.parallel import ParallelLayout
from minimax_m2.weights.model_weights import LAYER_WEIGHT_NAMES, LayerWeights, zero_model_weights

READ_BY_MATMULS = LAYER_WEIGHT_NAMES + ("embed", "final_norm", "lm_head", "k_cache", "v_cache")


@dataclass(frozen=True)
class Hardware:
    """What one rank has, with where each figure comes from."""

    name: str
    memory_bytes_per_s: float
    matmul_flops_per_s: float
    op_overhead_s: float  # per recorded op (dispatch): ~0 on a compiled device program
    collective_latency_s: float
    local_link_bytes_per_s: float  # collectives whose ranks share one chip (or one host)
    remote_link_bytes_per_s: float  # collectives across chips
    ranks_per_chip: int
    sources: dict[str, str] = field(default_factory=dict)
    # overrides collective_latency_s for a (kind, ranks in the group), e.g. ("all_reduce", 2)
    latency_by_collective: dict[tuple[str, int], float] = field(default_factory=dict)
    overlaps_memory_and_compute: bool = True  # False: a matmul streams its weights, then computes (time is the sum)
    launch_s: float = 0.0  # per unit launched (a runtime call from the host)
    host_transfer_s: float = 0.0  # per copy between host and device (setup and latency)
    host_bytes_per_s: float = float("inf")  # host <-> device link
    vector_ops_per_s: float = float("inf")  # element-wise operations (decoding 8-bit weights), beside the matmuls


TRN2 = Hardware(
    name="trn2.48xlarge, one logical NeuronCore (LNC=2: 4 per Trainium2 chip, 64 per instance)",
    memory_bytes_per_s=2.9e12 / 4,
    matmul_flops_per_s=667e12 / 4,
    op_overhead_s=0.0,
    collective_latency_s=10e-6,
    local_link_bytes_per_s=3.5e12 / 4,
    remote_link_bytes_per_s=1.28e12 / 4,
    ranks_per_chip=4,
    launch_s=10e-6,
    host_transfer_s=20e-6,
    host_bytes_per_s=16e9,
    vector_ops_per_s=2 * 128 * 1.4e9,
    sources={
        "HBM 2.9 TB/s and 667 dense BF16 TFLOPS per Trainium2 chip, 3.5 TB/s DMA, NeuronLink-v3 1.28 TB/s per chip":
            "AWS Neuron docs, Trainium2 architecture (awsdocs-neuron.readthedocs-hosted.com, "
            "about-neuron/arch/neuron-hardware/trainium2)",
        "16 chips in a 4x4 2D torus; LNC=2 gives 4 logical cores per chip, 64 ranks, ~24 GiB HBM each":
            "AWS Neuron docs, Trn2 architecture and training best practices",
        "per-rank figures": "chip figures divided by 4 logical cores",
        "collective latency 10 us per collective": "ASSUMED: no public per-collective latency for Trainium2 was "
                                                  "found; TPOT is also printed at 5 and 20 us",
        "matmuls at the dense BF16 peak, memory at the HBM peak": "ASSUMED: a roofline, not a measurement",
        "10 us per unit launched, 20 us and 16 GB/s per host-device copy":
            "ASSUMED: no public figure for nkipy's runtime calls was found; TPOT is also printed with launches at 5 "
            "and 30 us",
        "element-wise work 358 G operations/s (decoding FP8 codes), overlapping memory and matmuls":
            "ASSUMED: two physical cores' vector engines of 128 lanes at 1.4 GHz, one operation a lane a cycle; "
            "no public figure was found",
    },
)

# What a step launches and copies (minimax_m2/device/neuron.py; counted by tests/test_neuron_runner.py): the
# embedding, one unit per layer and the lm_head (which samples). A steady decode step brings each row's next
# id to the host and sends its position and random draw; a prefill step sends its tokens' ids, positions and
# validity and the step's small arrays (at most these many copies and bytes).
DECODE_HOST_COPIES = 3
DECODE_HOST_BYTES_PER_ROW = 12
PREFILL_HOST_COPIES = 16
PREFILL_HOST_BYTES_PER_TOKEN = 16


def decode_launches(layers: int) -> int:
    """Units launched per step: embedding, each layer, lm_head."""
    return layers + 2


def host_seconds(hw: "Hardware", layers: int, phase: str, tokens: int) -> float:
    """A step's launches and host-device copies on `hw`: a steady decode step of `tokens` rows, or a
    prefill step of `tokens` tokens."""
    copies, nbytes = ((DECODE_HOST_COPIES, DECODE_HOST_BYTES_PER_ROW * tokens) if phase == "decode"
                      else (PREFILL_HOST_COPIES, PREFILL_HOST_BYTES_PER_TOKEN * tokens))
    return decode_launches(layers) * hw.launch_s + copies * hw.host_transfer_s + nbytes / hw.host_bytes_per_s


NXDI_MEASURED = [
    ("NxDI MiniMax-M2 BF16, TP64, batch 1, trn2.48xlarge (measured)", 13.56),
    ("NxDI fork, TP32 (measured)", 19.9),
]


@dataclass
class UnitCost:
    name: str
    bytes_read: int
    expert_bytes: int  # of bytes_read, the experts' weights
    flops: int
    ops: int
    collectives: list[Collective]
    decode_ops: int = 0  # element-wise operations decoding 8-bit weights

    def seconds(self, hw: Hardware) -> float:
        memory, matmul = self.bytes_read / hw.memory_bytes_per_s, self.flops / hw.matmul_flops_per_s
        decode = self.decode_ops / hw.vector_ops_per_s
        compute = max(memory, matmul, decode) if hw.overlaps_memory_and_compute else memory + matmul + decode
        return compute + self.ops * hw.op_overhead_s + self.collective_seconds(hw)

    def collective_seconds(self, hw: Hardware) -> float:
        return sum(collective_seconds(c, hw) for c in self.collectives)


def wire_bytes(c: Collective) -> float:
    """Bytes one rank sends for a collective over n ranks (ring algorithms)."""
    n = len(c.replica_groups[0])
    if n == 1:
        return 0.0
    if c.name == "all_reduce":
        return 2 * (n - 1) / n * c.payload_bytes
    if c.name == "all_gather":
        return (n - 1) * c.payload_bytes
    return (n - 1) / n * c.payload_bytes  # all_to_all, reduce_scatter


def collective_seconds(c: Collective, hw: Hardware) -> float:
    group = c.replica_groups[0]
    if len(group) == 1:
        return 0.0
    local = len({r // hw.ranks_per_chip for r in group}) == 1
    latency = hw.latency_by_collective.get((c.name, len(group)), hw.collective_latency_s)
    return latency + wire_bytes(c) / (hw.local_link_bytes_per_s if local else hw.remote_link_bytes_per_s)


def unit_cost(name: str, program: Program) -> UnitCost:
    return UnitCost(name, program.weight_bytes(), program.weight_bytes(("w13", "w2")), program.flops, len(program.ops),
                    [c for c in program.collectives if len(c.replica_groups[0]) > 1], program.decode_ops)


def expert_cost(hw: Hardware, layer: LayerWeights) -> ExpertCost:
    """The cost of one of this layer's experts over n rows on `hw`: its weight bytes and matmul FLOPs, as
    the roofline costs a unit (overlapped where the hardware overlaps them)."""
    weight_bytes = layer.w13[0].nbytes + layer.w2[0].nbytes
    return roofline_cost(weight_bytes, 2 * (layer.w13[0].size + layer.w2[0].size), hw.memory_bytes_per_s,
                         hw.matmul_flops_per_s, hw.overlaps_memory_and_compute)


def record_programs(config: MiniMaxM2Config, layout: ParallelLayout, *, phase: str, batch: int, seq: int,
                    context: int, dtype: np.dtype = np.dtype(ml_dtypes.bfloat16), hw: Hardware | None = None,
                    schedule_cost: ExpertCost | None = None, position: int | None = None,
                    rows: int | None = None, kv_len: int | None = None,
                    fp8: bool = False, spread: bool = False) -> tuple[list[Unit], list[Program]]:
    """Rank 0's units for one phase and their recorded programs, at the config's shapes with zero weights
    (matmuls sized, not computed), with the expert schedule `hw` (TRN2 by default) would choose, or the
    one `schedule_cost` chooses; the step's tokens start at `position` (default: a prefill's at 0, a
    decode's at the context's last position), `rows` rows per attention group (default: the batch's), a
    prefill attending `kv_len` positions (default: the bucket of its last), FP8 projections and experts held as
    codes with `fp8` (the config's block size), every row's sequence striped over the attention groups with
    `spread` (context parallelism); a unit recording a violation is an error."""
    experts = list(range(config.num_local_experts))
    weights = zero_model_weights(config, experts, layout, dtype, fp8=fp8)
    rope = tuple(t.astype(dtype) for t in rope_tables(context, config.rotary_dim, config.rope_theta))
    position = position if position is not None else 0 if phase == "prefill" else context - 1
    cost = schedule_cost or expert_cost(hw or TRN2, weights.layers[0])
    units = program_units(config, layout, weights, rope, cost, phase=phase, batch=batch, seq=seq, max_seq_len=context,
                          position=position, rows=rows, kv_len=kv_len, spread=spread)
    programs = []
    previous = collectives.set_backend(EmulatedCollectives(LoopbackCollectives()))
    try:
        for unit in units:
            program, _ = trace_unit(unit.fn, unit.inputs, unit.constants, READ_BY_MATMULS, dry=True)
            if program.violations:
                raise ValueError(f"{unit.name} records violations: {program.violations}")
            programs.append(program)
    finally:
        collectives.set_backend(previous)
    return units, programs


def record_units(config: MiniMaxM2Config, layout: ParallelLayout, *, phase: str, batch: int, seq: int, context: int,
                 dtype: np.dtype = np.dtype(ml_dtypes.bfloat16), hw: Hardware | None = None,
                 schedule_cost: ExpertCost | None = None, position: int | None = None,
                 rows: int | None = None, kv_len: int | None = None, fp8: bool = False,
                 spread: bool = False) -> list[UnitCost]:
    """The costs of rank 0's units for one phase (see record_programs)."""
    units, programs = record_programs(config, layout, phase=phase, batch=batch, seq=seq, context=context, dtype=dtype,
                                      hw=hw, schedule_cost=schedule_cost, position=position, rows=rows, kv_len=kv_len,
                                      fp8=fp8, spread=spread)
    return [unit_cost(unit.name, program) for unit, program in zip(units, programs)]


def step_seconds(costs: list[UnitCost], layers: int, hw: Hardware) -> float:
    """On the device: embedding + layers x layer unit + lm_head."""
    embedding, layer, head = costs
    return embedding.seconds(hw) + layers * layer.seconds(hw) + head.seconds(hw)


def served_seconds(costs: list[UnitCost], layers: int, hw: Hardware, phase: str, tokens: int) -> float:
    """A step as the host sees it: `step_seconds` plus its launches and copies (`host_seconds`)."""
    return step_seconds(costs, layers, hw) + host_seconds(hw, layers, phase, tokens)


def distinct_expert_floor(config: MiniMaxM2Config, layout: ParallelLayout, tokens: int, expert_bytes: int) -> float:
    """Expected expert weight bytes one rank must read per layer for `tokens` tokens routed at random: each
    of its held experts (slices of `expert_bytes` each) read once if any token chose it."""
    held = config.num_local_experts // layout.moe_ep
    hit = 1 - (1 - config.num_experts_per_tok / config.num_local_experts) ** tokens
    return held * hit * expert_bytes


def static_expert_floor(config: MiniMaxM2Config, layout: ParallelLayout, tokens: int, expert_bytes: int) -> float:
    """Expert weight bytes per rank per layer that no static, dropless program can go below for `tokens`
    tokens: its reads are fixed before routing, and some routing picks min(tokens x top_k, held) distinct
    experts of a rank's held ones (slices of `expert_bytes` each), each of which must be read."""
    held = config.num_local_experts // layout.moe_ep
    return min(tokens * config.num_experts_per_tok, held) * expert_bytes


def moe_tp_choices(world: int, tp: int, config: MiniMaxM2Config, num_experts: int) -> list[int]:
    """Every moe_tp that fits: divides W and the intermediate size, nests with tp, leaves whole experts per group."""
    return [m for m in range(1, world + 1)
            if world % m == 0 and config.intermediate_size % m == 0 and (m % tp == 0 or tp % m == 0)
            and num_experts % (world // m) == 0]


def fastest_moe_tp(config: MiniMaxM2Config, world: int, tp: int, batch: int, context: int, num_experts: int,
                   hw: Hardware = TRN2) -> int:
    """The moe_tp whose decode step at this batch the projection says is fastest (ties: fewer slices)."""
    choices = moe_tp_choices(world, tp, config, num_experts)
    if len(choices) == 1:
        return choices[0]
    timed = []
    for m in choices:
        layout = ParallelLayout(world, tp, 0, moe_tp=m)
        costs = record_units(config, layout, phase="decode", batch=batch, seq=1, context=context)
        timed.append((step_seconds(costs, config.num_hidden_layers, hw), m))
    return min(timed)[1]
