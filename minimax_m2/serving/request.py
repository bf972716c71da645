"""One generation request as the engine tracks it: its prompt, sampling settings, slot and progress."""

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from minimax_m2.generation import Sampling
from minimax_m2.sampling import TokenLogprobs
from minimax_m2.serving.cache import Placement, Slot

# ("logprobs", (logprob, [(id, logprob), ...])) just before its ("token", id), when asked for;
# ("finish", reason); ("error", message)
Notify = Callable[[str, object], None]
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    notify: Notify = lambda kind, value: None
    keep_logits: bool = False  # keep the logits of every prompt position and of every new token
    id: int = field(default_factory=lambda: next(_ids))
    slot: Slot | None = None
    prefilled: int = 0  # prompt tokens whose keys and values are in the slot
    reused: int = 0  # of them, found cached (prefix reuse)
    generated: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per new token, if asked
    finish_reason: str | None = None
    rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    def admit(self, placement: Placement) -> None:
        self.slot = placement.slot
        self.prefilled = self.reused = placement.reused

    @property
    def decoding(self) -> bool:
        """The prompt is done and a new token waits to be fed."""
        return self.finish_reason is None and self.prefilled == len(self.prompt) and bool(self.generated)

    @property
    def length(self) -> int:
        """Tokens of the sequence so far: prompt and generated."""
        return len(self.prompt) + len(self.generated)
