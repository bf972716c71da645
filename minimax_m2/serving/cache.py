"""KV-cache slots and prefix reuse.

The model's cache holds `slots` rows per attention group; a request holds one row (its slot) from admission
to its end. A row keeps the token ids whose keys and values it holds, so that when a slot is freed its
contents stay usable: a later request whose prompt begins with them (the next turn of the same
conversation, or a shared system prompt) starts after them instead of recomputing them, either in that
slot itself or, when the slot is busy, in a copy of it. Free slots are given out least recently used
first, so the contents kept longest are those used most recently.
"""

from dataclasses import dataclass, field


@dataclass
class Slot:
    group: int
    index: int
    tokens: list[int] = field(default_factory=list)  # ids whose KV entries this row holds, positions 0..n-1
    busy: bool = False
    last_used: int = 0


@dataclass(frozen=True)
class Placement:
    """Where an admitted request runs: its slot, how many prompt tokens it finds cached there, and the slot
    to copy them from first (None: they are in the slot already, or there are none)."""

    slot: Slot
    reused: int
    copy_from: Slot | None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotCache:
    """Every attention group's slots: which are free, what each holds, and where a new request goes."""

    def __init__(self, groups: int, slots_per_group: int, min_copy: int = 32, reuse: bool = True):
        """min_copy: prompt tokens a copy of a busy slot's row must save (a copy moves a whole row), and
        that placing a request away from the group with the most free slots must save; reuse: False finds no
        prefix (every prompt is prefilled cold)."""
        self.slots = [[Slot(g, i) for i in range(slots_per_group)] for g in range(groups)]
        self.min_copy, self.reuse = min_copy, reuse
        self._clock = 0

    def free_count(self, group: int | None = None) -> int:
        groups = self.slots if group is None else [self.slots[group]]
        return sum(not s.busy for slots in groups for s in slots)

    def place(self, prompt: list[int]) -> Placement | None:
        """A slot for a request with this prompt (None when every slot is busy). The group: the one with the
        most free slots, unless another one holds a prefix of the prompt at least `min_copy` tokens longer
        (the next turn of a conversation goes where its history is). In the group: the free slot whose
        contents share the longest prefix with the prompt; a longer prefix held by a busy slot of that group
        is copied. At most len(prompt) - 1 tokens are reused: the last prompt token is always run, to give
        the first new token's logits."""
        candidates = [g for g in range(len(self.slots)) if self.free_count(g)]
        if not candidates:
            return None
        plans = {g: self._plan(g, prompt) for g in candidates}
        balanced = max(candidates, key=lambda g: (self.free_count(g), -g))
        reusing = max(candidates, key=lambda g: (plans[g][1], self.free_count(g), -g))
        group = reusing if plans[reusing][1] >= plans[balanced][1] + self.min_copy else balanced
        return self._take(*plans[group])

    def _plan(self, group: int, prompt: list[int]) -> tuple[Slot, int, Slot | None]:
        """Where the prompt would go in `group` (which has a free slot): (the slot, the tokens reused, the
        busy slot to copy them from or None)."""
        limit = len(prompt) - 1 if self.reuse else 0
        free = [s for s in self.slots[group] if not s.busy]
        best_free = max(free, key=lambda s: (min(common_prefix(s.tokens, prompt), limit), -s.last_used))
        reuse_free = min(common_prefix(best_free.tokens, prompt), limit)
        busy = [s for s in self.slots[group] if s.busy]
        best_busy = max(busy, key=lambda s: min(common_prefix(s.tokens, prompt), limit), default=None)
        reuse_busy = min(common_prefix(best_busy.tokens, prompt), limit) if best_busy else 0
        if reuse_busy and reuse_busy >= reuse_free + self.min_copy:
            return min(free, key=lambda s: s.last_used), reuse_busy, best_busy
        if reuse_free:
            return best_free, reuse_free, None
        return min(free, key=lambda s: s.last_used), 0, None

    def _take(self, slot: Slot, reused: int, copy_from: Slot | None) -> Placement:
        slot.busy = True
        source = copy_from.tokens if copy_from else slot.tokens
        slot.tokens = source[:reused]
        return Placement(slot, reused, copy_from)

    def release(self, slot: Slot) -> None:
        """The request in `slot` ended: the slot is free, its contents kept for reuse."""
        self._clock += 1
        slot.busy = False
        slot.last_used = self._clock
