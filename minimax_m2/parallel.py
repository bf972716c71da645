"""How a model is laid out over W ranks.

Attention: data parallel across W / tp groups, tensor parallel (heads split) inside a group; ranks
g*tp .. g*tp+tp-1 form attention group g. MoE: W = moe_tp x moe_ep; ranks e*moe_tp .. e*moe_tp+moe_tp-1
form slice group e, which holds experts e*L .. e*L+L-1 (L = E / moe_ep), each rank one of moe_tp slices
of their intermediate dimension. moe_tp = 1 is pure expert parallelism, moe_tp = W slices every expert
over all ranks.
"""

from dataclasses import dataclass

import numpy as np

from kernels.moe_parallel import worst_case_capacity
from minimax_m2.config import MiniMaxM2Config


def _groups(starts: range, size: int, stride: int = 1) -> list[list[int]]:
    return [[start + i * stride for i in range(size)] for start in starts]


@dataclass(frozen=True)
class ParallelLayout:
    """Rank `rank` of `world`: attention tp `tp`, experts sliced over `moe_tp` ranks."""

    world: int = 1
    tp: int = 1
    rank: int = 0
    capacity_factor: float | None = None  # None: worst-case capacity, no pair is ever dropped
    moe_tp: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or self.tp < 1 or self.moe_tp < 1:
            raise ValueError(f"world size, tp and moe_tp must be positive, got {self.world}, {self.tp}, {self.moe_tp}")
        if self.world % self.tp:
            raise ValueError(f"tp {self.tp} must divide the number of ranks {self.world}")
        if self.world % self.moe_tp:
            raise ValueError(f"moe_tp {self.moe_tp} must divide the number of ranks {self.world}")
        if self.moe_tp % self.tp and self.tp % self.moe_tp:
            raise ValueError(f"moe_tp {self.moe_tp} and tp {self.tp} must nest (one divides the other)")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world - 1}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity factor must be positive, got {self.capacity_factor}")

    def check(self, config: MiniMaxM2Config, num_experts: int) -> None:
        """Refuse layouts the model cannot be split into; called before any weight is read."""
        problems = []
        if num_experts % self.moe_ep:
            problems.append(f"{num_experts} loaded experts cannot be spread evenly over {self.moe_ep} rank groups "
                            f"(moe_ep = {self.world} ranks / moe_tp {self.moe_tp})")
        if config.intermediate_size % self.moe_tp:
            problems.append(f"moe_tp {self.moe_tp} does not divide the expert intermediate size "
                            f"{config.intermediate_size}")
        if config.num_key_value_heads % self.tp:
            problems.append(f"tp {self.tp} does not divide the {config.num_key_value_heads} KV heads")
        if config.num_experts_per_tok % self.tp:
            problems.append(f"tp {self.tp} does not divide the {config.num_experts_per_tok} experts chosen per token")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def dp(self) -> int:
        """Attention groups (data parallel)."""
        return self.world // self.tp

    @property
    def moe_ep(self) -> int:
        """Slice groups, each holding different experts."""
        return self.world // self.moe_tp

    @property
    def group(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def slice_group(self) -> int:
        return self.rank // self.moe_tp

    @property
    def slice_rank(self) -> int:
        return self.rank % self.moe_tp

    @property
    def world_groups(self) -> list[list[int]]:
        return [list(range(self.world))]

    @property
    def tp_groups(self) -> list[list[int]]:
        return _groups(range(0, self.world, self.tp), self.tp)

    @property
    def slice_groups(self) -> list[list[int]]:
        return _groups(range(0, self.world, self.moe_tp), self.moe_tp)

    @property
    def ep_groups(self) -> list[list[int]]:
        """Ranks at the same slice position in every slice group: they exchange pairs."""
        return _groups(range(self.moe_tp), self.moe_ep, self.moe_tp)

    @property
    def spread_groups(self) -> list[list[int]]:
        """The ranks holding the same attention heads in every attention group: they exchange a spread
        sequence's queries and softmax parts (context parallelism)."""
        return _groups(range(self.tp), self.dp, self.tp)

    @property
    def combine_groups(self) -> list[list[int]]:
        """Attention-tp ranks outside one slice group whose split expert choices are summed."""
        if self.moe_tp >= self.tp:
            return _groups(range(self.world), 1)
        return _groups([g * self.tp + j for g in range(self.dp) for j in range(self.moe_tp)], self.tp // self.moe_tp,
                       self.moe_tp)

    def local_experts(self, experts: list[int]) -> list[int]:
        """The expert ids this rank holds (whole or sliced): its slice group's run of the loaded (sorted) ids."""
        per_group = len(experts) // self.moe_ep
        return experts[self.slice_group * per_group : (self.slice_group + 1) * per_group]

    def intermediate_slice(self, intermediate: int) -> slice:
        """This rank's part of each held expert's intermediate dimension."""
        width = intermediate // self.moe_tp
        return slice(self.slice_rank * width, (self.slice_rank + 1) * width)

    def head_slice(self, heads: int, head_dim: int) -> slice:
        """This rank's columns of a [.., heads * head_dim] projection."""
        per_rank = heads // self.tp * head_dim
        return slice(self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank)

    def expert_slots(self, top_k: int, rank: int | None = None) -> np.ndarray:
        """Which of each token's top_k choices a rank dispatches (its attention tp group splits them)."""
        tp_rank = self.tp_rank if rank is None else rank % self.tp
        return np.arange(tp_rank, top_k, self.tp, dtype=np.int32)

    def slice_members(self) -> list[int]:
        """The ranks of this rank's slice group, in order."""
        return self.slice_groups[self.slice_group]

    def own_members(self) -> np.ndarray:
        """Positions in the slice group of the members holding this rank's tokens (its attention group)."""
        return np.array([i for i, r in enumerate(self.slice_members()) if r // self.tp == self.group], np.int32)

    def capacity(self, rows: int, top_k: int, local_experts: int) -> int:
        """Send-buffer rows per destination for the `rows` gathered tokens of a slice group."""
        worst = worst_case_capacity(rows, top_k // self.tp, local_experts)
        if self.capacity_factor is None:
            return worst
        return max(1, min(worst, int(np.ceil(self.capacity_factor * rows * top_k / self.tp / self.moe_ep))))

    def vocab_columns(self, vocab: int) -> int:
        """lm_head columns each rank holds: the vocabulary split evenly, the last rank zero-padded."""
        return -(-vocab // self.world)

    def embed_rows(self, vocab: int) -> int:
        """Embedding rows each rank holds: the vocabulary split evenly over its attention group (which looks up
        the same tokens), the last tp rank zero-padded."""
        return -(-vocab // self.tp)

    def rows_per_group(self, batch: int) -> int:
        """Batch rows each attention group runs (the batch is padded to a multiple of dp)."""
        return -(-batch // self.dp)

    def union_tokens(self, bucket: int, token_valid: np.ndarray, max_tokens: int = 0
                     ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
        """The real tokens this rank's slice group gathers: ((their indices in the gathered buffer, the member
        holding each, whether each entry is real), all [U]; U).

        token_valid: [dp * rows, seq] bool, every attention group's rows of the step, of which at most
        `bucket` are real, holding at most `max_tokens` real tokens in all (0: no bound beyond the rows).
        U, the most real tokens any slice group can gather, depends on these bounds and the layout alone, not
        on which rows are busy; entries past the real ones are padding (at least two entries in all: no
        compiled input has a dimension of 1).
        """
        rows, seq = token_valid.shape[0] // self.dp, token_valid.shape[1]
        groups = max(1, self.moe_tp // self.tp)  # attention groups a slice group spans
        copies = min(self.tp, self.moe_tp)  # members of a slice group holding the same row
        tokens = min(bucket, groups * rows) * seq
        size = (min(tokens, max_tokens) if max_tokens else tokens) * copies
        index = [m * rows * seq
                 + np.flatnonzero(token_valid[(member // self.tp) * rows : (member // self.tp + 1) * rows])
                 for m, member in enumerate(self.slice_members())]
        index = np.concatenate(index)
        if len(index) > size:
            raise ValueError(f"{len(index)} real tokens in a slice group exceed the step's bound of {size}")
        padded_to = max(2, size)
        real = np.arange(padded_to) < len(index)
        index = np.pad(index, (0, padded_to - len(index))).astype(np.int32)
        return (index, (index // (rows * seq)).astype(np.int32), real), size
