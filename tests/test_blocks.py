"""The paged KV cache's blocks: full blocks of a prefix are shared by reference, a partial last block is taken
over or copied on write, unreferenced blocks are evicted least recently used first, and over several
attention groups a request goes where its prefix is when that saves enough tokens."""

from minimax_m2.device.step import KV_BLOCK
from minimax_m2.serving.blocks import BlockManager, Placement, prefix_chains

HISTORY = list(range(1000, 1000 + 2 * KV_BLOCK + 44))  # a conversation so far: two full blocks and 44 tokens


def admit(manager: BlockManager, context: list[int], resumed: bool = False) -> Placement:
    groups = len(manager.pools)
    placement = manager.place(context, resumed, [0] * groups, [True] * groups)
    assert placement is not None
    return placement


def ran(manager: BlockManager, context: list[int], release: bool = True) -> Placement:
    """A request with this context ran: its tokens were written; released unless not `release`."""
    placement = admit(manager, context)
    manager.written(placement.group, placement.blocks, placement.reused, context[placement.reused:])
    if release:
        manager.release(placement.group, placement.blocks)
    return placement


def test_full_blocks_are_shared_and_a_finished_partial_block_is_taken_over() -> None:
    manager = BlockManager(groups=1, blocks_per_group=8)
    first = ran(manager, HISTORY)
    again = admit(manager, HISTORY + [7, 8])
    assert again.reused == len(HISTORY) and again.copy is None
    assert again.blocks == first.blocks  # the same three blocks: two shared full ones, the partial one taken over
    pool = manager.pools[0]
    assert [pool.blocks[b].refs for b in again.blocks] == [1, 1, 1]


def test_concurrent_requests_share_full_blocks_and_copy_the_partial_one() -> None:
    manager = BlockManager(groups=1, blocks_per_group=8, min_copy=32)
    holder = ran(manager, HISTORY, release=False)  # still running: it owns its partial block
    other = admit(manager, HISTORY + [9])
    assert other.blocks[:2] == holder.blocks[:2] and other.blocks[2] != holder.blocks[2]
    assert other.copy == (holder.blocks[2], other.blocks[2]) and other.reused == len(HISTORY)
    pool = manager.pools[0]
    assert [pool.blocks[b].refs for b in other.blocks[:2]] == [2, 2]
    assert manager.usage()["blocks_used"] == 4  # 3 + 1: the full blocks are held once


def test_a_short_partial_match_in_a_busy_block_is_not_copied() -> None:
    manager = BlockManager(groups=1, blocks_per_group=8, min_copy=32)
    ran(manager, HISTORY, release=False)
    placement = admit(manager, HISTORY[: 2 * KV_BLOCK + 10] + [5] * 50)
    assert placement.copy is None and placement.reused == 2 * KV_BLOCK


def test_at_most_all_but_the_last_prompt_token_is_reused_unless_resumed() -> None:
    manager = BlockManager(groups=1, blocks_per_group=8)
    ran(manager, HISTORY)
    assert admit(manager, list(HISTORY)).reused == len(HISTORY) - 1
    manager = BlockManager(groups=1, blocks_per_group=8)
    ran(manager, HISTORY)
    assert admit(manager, list(HISTORY), resumed=True).reused == len(HISTORY)


def test_unreferenced_blocks_are_evicted_least_recently_used_first() -> None:
    manager = BlockManager(groups=1, blocks_per_group=4)
    old = [1] * KV_BLOCK + [2]
    new = [3] * KV_BLOCK + [4]
    ran(manager, old)
    ran(manager, new)  # four blocks now hold contents, none referenced
    assert manager.usage() == {"blocks": 4, "blocks_used": 0, "blocks_cached": 4, "blocks_free": 0}
    admit(manager, [5] * (KV_BLOCK + 1))  # needs two: the old conversation's go first
    pool = manager.pools[0]
    assert pool.match(old, len(old), prefix_chains(old, len(old))) == ([], None, 0), "the evicted prefix is found"
    found, partial, shared = pool.match(new, len(new), prefix_chains(new, len(new)))
    assert len(found) == 1 and pool.blocks[partial].tokens == [4] and shared == 1, "the newer prefix was evicted"


def test_no_room_is_no_placement() -> None:
    manager = BlockManager(groups=1, blocks_per_group=2)
    admit(manager, [1] * (KV_BLOCK + 1))  # both blocks held
    assert manager.place([2, 3], False, [0], [True]) is None
    assert BlockManager(groups=1, blocks_per_group=3).place([2, 3], False, [3], [True]) is None  # all reserved


def test_the_next_turn_goes_to_the_group_holding_its_history() -> None:
    manager = BlockManager(groups=2, blocks_per_group=8, min_copy=32)
    admit(manager, [1] * 300)  # group 0 now has less room than group 1
    ran(manager, HISTORY)  # placed in group 1, the one with the most room
    admit(manager, [2] * 300)  # group 1 now has as little room as group 0
    placement = admit(manager, HISTORY + [7, 8])
    assert placement.group == 1 and placement.reused == len(HISTORY)


def test_a_short_shared_prefix_does_not_pull_every_request_into_one_group() -> None:
    manager = BlockManager(groups=2, blocks_per_group=8, min_copy=32)
    system = list(range(10))  # shorter than min_copy
    ran(manager, system + [50])
    groups = [admit(manager, system + [60 + i]).group for i in range(4)]
    assert sorted(groups) == [0, 0, 1, 1], "requests should spread over the groups"


def test_a_striped_request_takes_block_j_from_group_j_mod_groups_and_finds_its_striped_prefix() -> None:
    manager = BlockManager(groups=2, blocks_per_group=4)
    context = list(range(5 * KV_BLOCK + 3))  # six blocks: three in each group
    first = manager.place_striped(context, False, [0, 0], [True, True])
    assert first is not None and first.striped and first.reused == 0 and len(first.blocks) == 6
    assert [manager.owner(first.group, j, True) for j in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [p.available() for p in manager.pools] == [1, 1]
    assert manager.place_striped(context, False, [0, 0], [True, True]) is None  # three more a group: no room
    manager.written(first.group, first.blocks, 0, context, striped=True)
    manager.release(first.group, first.blocks, striped=True)
    assert manager.usage()["blocks_used"] == 0 and [p.available() for p in manager.pools] == [4, 4]
    again = manager.place_striped(context + [1, 2], False, [0, 0], [True, True])
    assert again is not None and again.reused == 5 * KV_BLOCK  # its five full blocks, each in its group
    assert again.blocks[:5] == first.blocks[:5]
    assert manager.place_striped(context, False, [0, 0], [False, False]) is None  # no open row anywhere
