"""KV-cache slots and where a request goes: over several attention groups, a prompt goes where its prefix is
(free or busy) when that saves enough tokens, and to the group with the most free slots otherwise."""

from minimax_m2.serving.cache import SlotCache

HISTORY = list(range(100, 160))  # a 60-token conversation so far


def finished(cache: SlotCache, prompt: list[int]) -> None:
    """A request with this prompt ran to its end: its slot is free and holds the prompt."""
    placement = cache.place(prompt)
    placement.slot.tokens = list(prompt)
    cache.release(placement.slot)


def test_the_next_turn_goes_to_the_group_holding_its_history() -> None:
    cache = SlotCache(groups=2, slots_per_group=2, min_copy=32)
    cache.place([1, 2, 3])  # group 0 now has fewer free slots than group 1
    finished(cache, HISTORY)  # placed in group 1, the least busy
    cache.place([4, 5])  # group 1 is now as busy as group 0: ties go to group 0
    placement = cache.place(HISTORY + [7, 8])
    assert placement.slot.group == 1 and placement.reused == len(HISTORY) and placement.copy_from is None


def test_a_busy_slots_prefix_is_copied_within_its_group() -> None:
    cache = SlotCache(groups=2, slots_per_group=3, min_copy=32)
    holder = cache.place(HISTORY)
    holder.slot.tokens = list(HISTORY)
    placement = cache.place(HISTORY + [9])  # group 1 has more free slots, group 0 the prefix
    assert placement.slot.group == holder.slot.group == 0
    assert placement.copy_from is holder.slot and placement.reused == len(HISTORY)


def test_a_short_shared_prefix_does_not_pull_every_request_into_one_group() -> None:
    cache = SlotCache(groups=2, slots_per_group=4, min_copy=32)
    system = list(range(10))  # shorter than min_copy
    finished(cache, system + [50])
    groups = [cache.place(system + [60 + i]).slot.group for i in range(4)]
    assert sorted(groups) == [0, 0, 1, 1], "requests should spread over the groups"


def test_at_most_all_but_the_last_prompt_token_is_reused() -> None:
    cache = SlotCache(groups=1, slots_per_group=2)
    finished(cache, HISTORY)
    assert cache.place(list(HISTORY)).reused == len(HISTORY) - 1
