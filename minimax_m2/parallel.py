"""How a model is laid out over W ranks: experts spread (EP over all W), attention data parallel across
W / tp groups and tensor parallel (heads split) inside a group."""

from dataclasses import dataclass

import numpy as np

from kernels.moe_dispatch import worst_case_capacity
from minimax_m2.config import MiniMaxM2Config


@dataclass(frozen=True)
class ParallelLayout:
    """Rank `rank` of `world`; ranks g*tp .. g*tp+tp-1 form attention group g."""

    world: int = 1
    tp: int = 1
    rank: int = 0
    capacity_factor: float | None = None  # None: worst-case capacity, no pair is ever dropped

    def __post_init__(self) -> None:
        if self.world < 1 or self.tp < 1:
            raise ValueError(f"world size and tp must be positive, got {self.world} and {self.tp}")
        if self.world % self.tp:
            raise ValueError(f"tp {self.tp} must divide the number of ranks {self.world}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world - 1}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity factor must be positive, got {self.capacity_factor}")

    def check(self, config: MiniMaxM2Config, num_experts: int) -> None:
        """Refuse layouts the model cannot be split into; called before any weight is read."""
        problems = []
        if num_experts % self.world:
            problems.append(f"{num_experts} loaded experts cannot be spread evenly over {self.world} ranks")
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
    def group(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_groups(self) -> list[list[int]]:
        return [list(range(self.world))]

    @property
    def tp_groups(self) -> list[list[int]]:
        return [list(range(g * self.tp, (g + 1) * self.tp)) for g in range(self.dp)]

    def local_experts(self, experts: list[int]) -> list[int]:
        """The expert ids this rank holds: the rank-th of W equal runs of the loaded (sorted) ids."""
        per_rank = len(experts) // self.world
        return experts[self.rank * per_rank : (self.rank + 1) * per_rank]

    def head_slice(self, heads: int, head_dim: int) -> slice:
        """This rank's columns of a [.., heads * head_dim] projection."""
        per_rank = heads // self.tp * head_dim
        return slice(self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank)

    def expert_slots(self, top_k: int) -> np.ndarray:
        """Which of each token's top_k choices this rank dispatches (its tp group splits them)."""
        return np.arange(self.tp_rank, top_k, self.tp, dtype=np.int32)

    def capacity(self, tokens: int, top_k: int, local_experts: int) -> int:
        """Send-buffer rows per destination rank for `tokens` tokens of this rank."""
        worst = worst_case_capacity(tokens, top_k // self.tp, local_experts)
        if self.capacity_factor is None:
            return worst
        return max(1, min(worst, int(np.ceil(self.capacity_factor * tokens * top_k / self.tp / self.world))))

    def vocab_columns(self, vocab: int) -> int:
        """lm_head columns each rank holds: the vocabulary split evenly, the last rank zero-padded."""
        return -(-vocab // self.world)

    def rows_per_group(self, batch: int) -> int:
        """Batch rows each attention group runs (the batch is padded to a multiple of dp)."""
        return -(-batch // self.dp)
