"""Spreading the compile set over a host's ranks: which rank compiles which program.

Every rank traces the same programs (rank-specific values are inputs), so each distinct program need be
compiled once per host, into the build directory its ranks share (nkipy names a NEFF by a hash of the traced
program and the compiler arguments), and then loaded by every rank. `deal` gives each rank its share,
largest programs first, each to the rank with the least work so far, so that the ranks finish together.
"""

import math

from kernels.moe_grouped import DENSE, expert_blocks
from minimax_m2.device.program import Unit


def program_weight(unit: Unit) -> int:
    """A unit's size for dealing, a proxy of its recorded op count: a layer unit unrolls its expert blocks
    and its attention tiles; every other unit is small."""
    c = unit.constants
    if "block_rows" not in c:
        return 1
    local = unit.inputs["w13"].shape[0]
    blocks = local if c["block_rows"] == DENSE else expert_blocks(c["real_pairs"], local, c["block_rows"])
    return blocks + c["kv_len"] // c["kv_tile"] + 1


def deal(weights: list[int], ranks: int) -> list[list[int]]:
    """Indices of `weights` for each of `ranks` ranks: largest first, each to the least loaded rank (the
    lowest on a tie) among those holding fewer than ceil(len / ranks) + 1 (a compile costs time whatever its
    size, so no rank gets many small ones)."""
    shares: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    cap = math.ceil(len(weights) / ranks) + 1
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        rank = min((r for r in range(ranks) if len(shares[r]) < cap), key=lambda r: (load[r], len(shares[r]), r))
        shares[rank].append(index)
        load[rank] += weights[index]
    return shares


def warm_up_seconds(programs: int, ranks: int, seconds_each: float) -> tuple[float, float]:
    """(serial, spread) seconds to compile `programs` at `seconds_each` each: one after another, or dealt
    over `ranks` ranks of one host."""
    return programs * seconds_each, math.ceil(programs / ranks) * seconds_each
