"""One generation request as the engine tracks it: its prompt, sampling settings, cache blocks and progress."""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from minimax_m2.generation import Sampling
from minimax_m2.sampling import TokenLogprobs
from minimax_m2.serving.blocks import Placement

if TYPE_CHECKING:
    from minimax_m2.serving.constraint import Constraint
    from minimax_m2.serving.drafts import NgramDrafter

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
    group: int | None = None  # the attention group it runs in, once admitted
    blocks: list[int] = field(default_factory=list)  # its block table: the cache blocks of positions 0, 1, ..
    striped: bool = False  # block j of its table lies in group j % groups (its cache spread over the groups)
    prefilled: int = 0  # context tokens whose keys and values are in its blocks
    reused: int = 0  # of them, found cached at its admission (prefix reuse)
    kept: int = 0  # positions whose logits it kept (keep_logits), so that a recomputed prefix keeps none twice
    generated: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # per new token, if asked
    finish_reason: str | None = None
    rng: np.random.Generator | None = None
    constraint: "Constraint | None" = None  # the grammar its tokens are held to (structured output)
    drafter: "NgramDrafter | None" = None  # its draft tokens, when it speculates

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.sampling.seed)

    def admit(self, placement: Placement) -> None:
        self.group, self.blocks, self.striped = placement.group, placement.blocks, placement.striped
        self.prefilled = self.reused = placement.reused

    def evict(self) -> None:
        """Its blocks were taken back (preemption): it waits again, and runs its context again when admitted."""
        self.group, self.blocks, self.prefilled = None, [], 0

    @property
    def context(self) -> list[int]:
        """The tokens whose keys and values must be cached before its next token is fed: the prompt, and once
        it has generated, every generated token but the last (the one fed next)."""
        return self.prompt + self.generated[:-1]

    @property
    def context_length(self) -> int:
        """len(context), without copying an agent's 100,000-token prompt every step to count it."""
        return len(self.prompt) + max(0, len(self.generated) - 1)

    def context_tokens(self, start: int, end: int) -> list[int]:
        """context[start:end], copying only those."""
        prompt, end = len(self.prompt), min(end, self.context_length)
        return self.prompt[start:end] + self.generated[max(0, start - prompt) : max(0, end - prompt)]

    @property
    def sequence(self) -> "Joined":
        """The prompt and the generated tokens as one sequence, neither copied (what its drafter reads)."""
        return Joined(self.prompt, self.generated)

    @property
    def decoding(self) -> bool:
        """The context is cached and a new token waits to be fed."""
        return self.finish_reason is None and bool(self.generated) and self.prefilled == self.context_length

    @property
    def final_length(self) -> int:
        """Positions it holds at most: the prompt and every new token but the last (whose KV is never written)."""
        return len(self.prompt) + self.sampling.max_new_tokens - 1

    @property
    def length(self) -> int:
        """Tokens of the sequence so far: prompt and generated."""
        return len(self.prompt) + len(self.generated)


class Joined(Sequence[int]):
    """Two lists read as one (head + tail), neither copied: its length, items and slices (of step 1)."""

    def __init__(self, head: list[int], tail: list[int]):
        self.head, self.tail = head, tail

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def __getitem__(self, index: int | slice) -> int | list[int]:
        split = len(self.head)
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            return self.head[start:min(stop, split)] + self.tail[max(0, start - split) : max(0, stop - split)]
        index = index + len(self) if index < 0 else index
        return self.head[index] if index < split else self.tail[index - split]
