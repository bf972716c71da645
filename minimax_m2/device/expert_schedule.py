"""Which expert schedule a layer unit uses, costed for the hardware that runs it.

`kernels.moe_grouped.grouped_experts` takes its schedule as a trace-time constant, `block_rows`: blocks of
B rows sorted by expert (B = 1, 2, 4, ... 128), or dense (every held expert over every row). The choice
minimises the worst-case step time of P rows over E experts:

    blocked(B) = d x cost(B) + (n - d) x cost(B, repeated)        dense = E x cost(P)

with n = expert_blocks(P, E, B) blocks, of which at most d = min(n, E) read a new expert: blocks are in
expert order, so every other block repeats the expert of the block before it (an expert's further
blocks, and the padding blocks at the end). cost(n, repeated) is the time of one expert applied to n
rows on the target, its weights just read or not:

- a NeuronCore (`roofline_cost`, from `minimax_m2.device.roofline.Hardware`): the DMA of the expert's weights
  overlaps the matmuls, so cost(n) = max(weight bytes / HBM bandwidth, FLOPs / bf16 rate), repeated or
  not (each block DMAs its weights); 128 rows cost about one weight read.
- this CPU (`measured_table` of `measure_block_times`): timed once per model for the expert's own
  shapes, from memory (an expert of the next layer, not touched before) and again from the cache. On one
  CPU a handful of rows already cost as much as the read: a one-row product streams the weights at
  memory speed, while BLAS packs the weights for any product of two or more rows (measured here: 2 to 16
  rows cost about 2.7x one row); a repeated expert comes from the cache.

Both targets run the same kernel; only the constant differs. This CPU may also take the DYNAMIC schedule
(each expert hit applied once to its own rows: shapes no compiled program can have, and none is ever
traced), costed as hit experts x cost(rows / hit): it wins from about a hundred pairs (a prefill), while
a decode's few rows an expert run faster as blocks of one row (BLAS packs a weight for two or more rows,
which costs about what streaming it for one does). Every block size either target can pick is tested under nkipy's
emulated semantics (tests/test_nkipy_semantics.py).
"""

import time
from collections.abc import Callable, Sequence

import numpy as np

from kernels.matmul import matmul
from kernels.moe_expert import moe_expert
from kernels.moe_grouped import DENSE, DYNAMIC, expert_blocks, expert_weights

BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
PRODUCT_SIZES = (1, 2, 4, 8)  # rows of the lm_head's product timed (`measure_product_times`)
REPEATED_CALLS = 4  # a repeated expert's time is the mean of this many calls in a row, as consecutive blocks run
APART_SAVING = 0.1  # see rows_apart
WARM_UP_ROUNDS = 2  # rounds of measurements left out (a process's first products run slower)
# (rows, repeated) -> seconds for one expert applied to that many rows, its weights just read (repeated) or not
ExpertCost = Callable[..., float]


def blocked_seconds(rows: int, num_experts: int, block_rows: int, cost: ExpertCost) -> float:
    """Worst-case time of blocks of `block_rows` over `rows` rows and `num_experts` experts."""
    blocks = expert_blocks(rows, num_experts, block_rows)
    new = min(blocks, num_experts)
    return new * cost(block_rows) + (blocks - new) * cost(block_rows, repeated=True)


def choose_block_rows(rows: int, num_experts: int, cost: ExpertCost) -> int:
    """The cheapest schedule for `rows` rows over `num_experts` experts: a block size, or DENSE (0), or, on a
    target that runs NumPy itself (a cost marked `dynamic`, this CPU's: it needs no static shapes), DYNAMIC
    where its expected time is the least.
    Ties go to the schedule listed first: blocks of one row, then larger blocks, then dense."""
    if num_experts == 1:
        return DENSE
    options = [(blocked_seconds(rows, num_experts, b, cost), b) for b in BLOCK_SIZES if b == 1 or b <= rows]
    options.append((num_experts * cost(rows), DENSE))
    if runs_numpy(cost):
        options.append((dynamic_seconds(rows, num_experts, cost), DYNAMIC))
    return min(options, key=lambda option: option[0])[1]


def runs_numpy(cost: ExpertCost | None) -> bool:
    """Whether the target these costs describe runs the units as NumPy itself (this CPU: its measured table
    is marked `dynamic`; None, not measured yet, is this CPU too), so that it may take schedules no compiled
    program can have, and every shape is free."""
    return cost is None or getattr(cost, "dynamic", False)


def compiled_only(cost: ExpertCost) -> ExpertCost:
    """The same costs for a target that runs compiled programs only: never `runs_numpy`, so no schedule of
    NumPy's own (DYNAMIC, the host attention, the partial sort) is chosen for it."""
    def static(rows: int, repeated: bool = False) -> float:
        return cost(rows, repeated)

    static.dynamic = False
    return static


def dynamic_seconds(rows: int, num_experts: int, cost: ExpertCost) -> float:
    """Expected time of the DYNAMIC schedule for `rows` rows routed at random over `num_experts` experts: each
    expert hit once, over its share of the rows (few rows a product cost this CPU about what blocks of one row
    do, so below some size the static blocks of one row win: the chooser compares)."""
    hit = num_experts * (1 - (1 - 1 / num_experts) ** rows)
    return hit * cost(max(1, round(rows / hit)))


def rows_apart(rows: int, cost: ExpertCost) -> bool:
    """Whether a few rows multiply a weight one at a time: where, by the target's cost of one expert (its
    weights read afresh), multiplying them together saves less than APART_SAVING of doing it row by row.
    So on a CPU at two rows (its BLAS packs the weight for two or more, which costs what streaming it for a
    row does: a large or transposed weight such as the lm_head's then multiplies two rows apart in about
    half the time), never on a NeuronCore (the weight streams once either way)."""
    return 1 < rows <= BLOCK_SIZES[-1] and cost(rows) >= (1 - APART_SAVING) * rows * cost(1)


def roofline_cost(weight_bytes: int, flops_per_row: int, memory_bytes_per_s: float, matmul_flops_per_s: float,
                  overlaps: bool = True) -> ExpertCost:
    """cost(n) of a roofline target: weight reads and n rows' matmuls, overlapped (NeuronCore) or added;
    a repeated expert is read again (no cache holds it)."""
    def cost(rows: int, repeated: bool = False) -> float:
        memory, compute = weight_bytes / memory_bytes_per_s, rows * flops_per_row / matmul_flops_per_s
        return max(memory, compute) if overlaps else memory + compute

    return cost


def measure_block_times(layers: Sequence[tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]],
                        dtype: np.dtype, repeats: int = 5) -> dict[int, tuple[float, float]]:
    """Seconds for one expert applied to each block size of BLOCK_SIZES on this CPU, for the experts of these
    layers ((w13 [E, 2I', hidden], w2 [E, hidden, I'], their FP8 scales or None) each; rows in `dtype`,
    FP8 experts dequantised as the units do) -> {B: (from memory, repeated at once)}:
    medians of `repeats` rounds, each round timing every size in turn (so that the machine's slow moments
    fall on all sizes alike), after WARM_UP_ROUNDS rounds left out. Every weight is read once first: the
    first read of freshly written or mapped memory runs slower than a steady step's (measured here: it
    made one row look 2-3x dearer and chose blocks of 16 for a 32-row decode that blocks of one row run in
    half the time). Each first product takes an expert not used before in the measurement, from the next
    layer in turn, so that it reads its weights from memory as a step does (a step streams every layer's
    experts; one layer's experts timed again and again would sit in the cache)."""
    for weights in (w for layer in layers for w in layer[:2]):  # as a steady step finds them: mapped and read before
        np.max(weights.view(f"u{weights.dtype.itemsize}"))
    hidden = layers[0][0].shape[2]
    rng = np.random.default_rng(0)
    rows = {b: rng.standard_normal((b, hidden)).astype(dtype) for b in BLOCK_SIZES}
    samples: dict[int, list[list[float]]] = {b: [] for b in BLOCK_SIZES}
    drawn = 0
    for _ in range(repeats + WARM_UP_ROUNDS):
        for b in BLOCK_SIZES:
            w13, w2, scales = layers[drawn % len(layers)]
            e = (drawn // len(layers) * 7) % w13.shape[0]
            drawn += 1
            pair = []
            for calls in (1, REPEATED_CALLS):
                start = time.perf_counter()
                for _ in range(calls):
                    moe_expert(rows[b], *expert_weights(w13, w2, e, scales, dtype))
                pair.append((time.perf_counter() - start) / calls)
            samples[b].append(pair)
    return {b: tuple(float(t) for t in np.median(samples[b][WARM_UP_ROUNDS:], axis=0)) for b in BLOCK_SIZES}


def measure_product_times(weight: np.ndarray, dtype: np.dtype, sizes: Sequence[int] = PRODUCT_SIZES,
                          repeats: int = 3) -> dict[int, float]:
    """Seconds of `sizes` rows times a large weight [k, m] on this CPU (the lm_head's: its BLAS packs a weight
    this large for two rows or more at a price an expert's product does not show) -> {rows: seconds},
    medians of `repeats` rounds after WARM_UP_ROUNDS left out, each round timing every size in turn."""
    rng = np.random.default_rng(0)
    rows = {n: rng.standard_normal((n, weight.shape[0])).astype(dtype) for n in sizes}
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats + WARM_UP_ROUNDS):
        for n in sizes:
            start = time.perf_counter()
            matmul(rows[n], weight)
            samples[n].append(time.perf_counter() - start)
    return {n: float(np.median(samples[n][WARM_UP_ROUNDS:])) for n in sizes}


def measured_table(timed: dict[int, float | tuple[float, float]], dynamic: bool = False) -> ExpertCost:
    """cost(n, repeated) from measured times of the block sizes ({B: seconds} or {B: (from memory,
    repeated)}): exact at them, linear between and beyond them. A block of more rows never costs less than
    a smaller one (it does the smaller one's work and more): each time is raised to the largest time of
    the smaller sizes, so that a noisy measurement cannot make a larger block look cheaper. Beyond the
    largest size each further row costs at least what a row costs there with the weights already read
    (its repeated time per row), so that a flat measured tail cannot make the dense schedule look free."""
    sizes = sorted(timed)
    pairs = [timed[b] if isinstance(timed[b], tuple) else (timed[b], timed[b]) for b in sizes]
    cold = list(np.maximum.accumulate([p[0] for p in pairs]))
    warm = list(np.maximum.accumulate([min(p) for p in pairs]))  # <= cold: each min(p) <= p[0]
    per_row = warm[-1] / sizes[-1]

    def line(times: list[float]) -> Callable[[int], float]:
        slope = max(per_row, (times[-1] - times[-2]) / (sizes[-1] - sizes[-2]))
        return lambda rows: (times[-1] + slope * (rows - sizes[-1]) if rows >= sizes[-1]
                             else float(np.interp(rows, sizes, times)))

    cold_line, warm_line = line(cold), line(warm)

    def cost(rows: int, repeated: bool = False) -> float:
        return warm_line(rows) if repeated else cold_line(rows)

    cost.dynamic = dynamic
    return cost
