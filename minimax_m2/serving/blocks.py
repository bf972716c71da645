"""The paged KV cache's blocks: a pool per attention group, block tables per request, and a prefix cache.

Each attention group's cache is a pool of blocks of KV_BLOCK positions. A request holds a block table (the
blocks of its positions 0, 1, ..) from admission to its end; blocks are given out as its sequence grows.
A block remembers the token ids whose keys and values it holds and the chain of blocks before it, so
that its contents outlive the request:

- a *full* block is indexed by the hash of its whole prefix (the chain of full blocks up to and
  including it): a later request whose prompt starts with that prefix references the block instead of
  recomputing it, however many requests share it (reference counts);
- a block that is not full is found through the prefix before it; a request continuing only part of it
  takes it over when nobody holds it, or copies it into a block of its own (copy on write) when its
  owner is still writing it;
- a block nobody references stays cached until the pool needs it: blocks never written are given out
  first, then cached ones, least recently used first (their index entries go with them).

Every request runs the tokens of its context after the cached prefix; at most len(prompt) - 1 tokens are
reused for a new request (the last one's logits give the first new token).
"""

from collections import OrderedDict
from dataclasses import dataclass, field

from minimax_m2.device.step import KV_BLOCK, blocks_for

ROOT = 0  # the chain hash of the empty prefix


@dataclass
class Block:
    id: int
    tokens: list[int] = field(default_factory=list)  # ids whose K/V it holds, at its positions in order
    parent: int = ROOT  # chain hash of the full blocks before it
    refs: int = 0
    chain: int | None = None  # its own chain hash once full and indexed


@dataclass(frozen=True)
class Placement:
    """Where an admitted request runs: its attention group, the cached blocks it references (full ones), the
    blocks it receives, how many context tokens it finds cached, and the copy to make first ((source,
    target) block ids, or None)."""

    group: int
    blocks: list[int]
    reused: int
    copy: tuple[int, int] | None
    striped: bool = False  # block j of its table lies in group j % groups (context parallelism), `group` its row's


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chain_hash(parent: int, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))


def prefix_chains(context: list[int], limit: int) -> list[int]:
    """The chain hash of each full block of context[:limit], computed once for every group's pool."""
    chains, chain = [], ROOT
    for start in range(0, limit - KV_BLOCK + 1, KV_BLOCK):
        chain = chain_hash(chain, context[start : start + KV_BLOCK])
        chains.append(chain)
    return chains


class GroupPool:
    """One attention group's blocks."""

    def __init__(self, blocks: int):
        self.blocks = [Block(i) for i in range(blocks)]
        self.unwritten: OrderedDict[int, None] = OrderedDict((i, None) for i in range(blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks with contents, LRU first
        self.full: dict[int, int] = {}  # chain hash -> block id
        self.children: dict[int, set[int]] = {}  # parent chain hash -> blocks with contents after it

    def available(self) -> int:
        return len(self.unwritten) + len(self.cached)

    def take(self) -> int:
        """A block for new contents: one never written, else the least recently used cached one (forgotten)."""
        if self.unwritten:
            return self.unwritten.popitem(last=False)[0]
        block = self.cached.popitem(last=False)[0]
        self._forget(self.blocks[block])
        return block

    def claim(self) -> int:
        """A block taken (`take`) and referenced (`hold`): one more block of a request's table."""
        block = self.take()
        self.hold(block)
        return block

    def hold(self, block: int) -> None:
        """Reference a block (a cached prefix found, or a block taken)."""
        self.cached.pop(block, None)
        self.blocks[block].refs += 1

    def release(self, block: int) -> None:
        b = self.blocks[block]
        b.refs -= 1
        if b.refs == 0:
            (self.cached if b.tokens else self.unwritten)[block] = None

    def _forget(self, b: Block) -> None:
        if b.chain is not None and self.full.get(b.chain) == b.id:
            del self.full[b.chain]
        self.children.get(b.parent, set()).discard(b.id)
        b.tokens, b.parent, b.chain = [], ROOT, None

    def write(self, block: int, parent: int, tokens: list[int]) -> None:
        """Record that `tokens` follow the block's contents (its prefix's chain hash `parent`); index it by its
        prefix, and by its own chain once full."""
        b = self.blocks[block]
        if not b.tokens:
            b.parent = parent
            self.children.setdefault(parent, set()).add(block)
        b.tokens += tokens
        if len(b.tokens) == KV_BLOCK and b.chain is None:
            b.chain = chain_hash(b.parent, b.tokens)
            self.full.setdefault(b.chain, block)

    def truncate(self, block: int, keep: int) -> None:
        """Keep the first `keep` tokens of a block this request now owns alone (taken over)."""
        b = self.blocks[block]
        if b.chain is not None and self.full.get(b.chain) == block:
            del self.full[b.chain]
        b.chain = None
        b.tokens = b.tokens[:keep]
        if not keep:
            self.children.get(b.parent, set()).discard(block)
            b.parent = ROOT

    def match(self, context: list[int], limit: int, chains: list[int]) -> tuple[list[int], int | None, int]:
        """The cached prefix of `context` usable up to `limit` tokens (`chains`: the chain hashes of its full
        blocks, `prefix_chains`): (the full blocks that hold it, the block after them sharing the most of the
        rest or None when none shares a token, how many tokens it shares)."""
        found, chain = [], ROOT
        while (len(found) + 1) * KV_BLOCK <= limit:
            start = len(found) * KV_BLOCK
            block = self.full.get(chains[len(found)])
            if block is None or self.blocks[block].tokens != context[start : start + KV_BLOCK]:
                break
            found.append(block)
            chain = self.blocks[block].chain
        rest = context[len(found) * KV_BLOCK : limit]
        shared, best = max(((common_prefix(self.blocks[b].tokens, rest), -b) for b in self.children.get(chain, ())),
                           default=(0, 0))
        return found, -best if shared else None, shared


class BlockManager:
    """Every attention group's pool, the requests' block tables, and where a new request goes."""

    def __init__(self, groups: int, blocks_per_group: int, min_copy: int = 32, reuse: bool = True):
        """min_copy: tokens a copied block must save (a copy runs one unit per layer), and that placing a
        request away from the group with the most room must save; reuse: False finds no prefix."""
        self.pools = [GroupPool(blocks_per_group) for _ in range(groups)]
        self.blocks_per_group = blocks_per_group
        self.min_copy, self.reuse = min_copy, reuse

    def place(self, context: list[int], resumed: bool, reserve: list[int], open_rows: list[bool]) -> Placement | None:
        """Blocks for a request whose context (prompt, and for a request resumed after preemption the tokens it
        generated but the last) is `context`, in the group that holds most of it cached, unless that saves
        less than `min_copy` tokens over the group with the most room; None when no group with an open row
        (`open_rows`) has enough blocks beyond `reserve` (held back for the running requests' next blocks)."""
        limit = (len(context) if resumed else len(context) - 1) if self.reuse else 0
        chains = prefix_chains(context, limit)
        plans = {}
        for g, pool in enumerate(self.pools):
            if not open_rows[g]:
                continue
            plan = self._plan(pool, context, limit, chains)
            if pool.available() - plan[3] - reserve[g] >= 0:
                plans[g] = plan
        if not plans:
            return None
        room = max(plans, key=lambda g: (self.pools[g].available() - reserve[g], -g))
        reusing = max(plans, key=lambda g: (plans[g][1], self.pools[g].available() - reserve[g], -g))
        group = reusing if plans[reusing][1] >= plans[room][1] + self.min_copy else room
        return self._take(group, context, *plans[group][:3])

    def place_striped(self, context: list[int], resumed: bool, reserve: list[int],
                      open_rows: list[bool]) -> Placement | None:
        """Blocks for a request whose cache is striped over the groups (block j of its table in group j %
        groups), reusing the full blocks of a cached prefix striped the same way, its row in the group with an
        open row and the most room; None when some group lacks blocks beyond `reserve` or no row is open."""
        groups = len(self.pools)
        limit = (len(context) if resumed else len(context) - 1) if self.reuse else 0
        found: list[int] = []
        for j, chain in enumerate(prefix_chains(context, limit)):
            pool = self.pools[j % groups]
            block = pool.full.get(chain)
            if block is None or pool.blocks[block].tokens != context[j * KV_BLOCK : (j + 1) * KV_BLOCK]:
                break
            found.append(block)
        given = [0] * groups
        for j in range(len(found), blocks_for(len(context))):
            given[j % groups] += 1
        for j, block in enumerate(found):
            given[j % groups] += self.pools[j % groups].blocks[block].refs == 0
        room = [pool.available() - n - r for pool, n, r in zip(self.pools, given, reserve)]
        if min(room) < 0 or not any(open_rows):
            return None
        home = max((g for g in range(groups) if open_rows[g]), key=lambda g: (room[g], -g))
        blocks = []
        for j in range(blocks_for(len(context))):
            pool = self.pools[j % groups]
            if j < len(found):
                pool.hold(found[j])
                blocks.append(found[j])
            else:
                blocks.append(pool.claim())
        return Placement(home, blocks, len(found) * KV_BLOCK, None, striped=True)

    def owner(self, group: int, index: int, striped: bool) -> int:
        """The group holding block `index` of a table: its request's group, or index % groups when striped."""
        return index % len(self.pools) if striped else group

    def _plan(self, pool: GroupPool, context: list[int], limit: int, chains: list[int]) -> tuple:
        """(full blocks found, tokens reused, the partial block to continue (block, tokens shared, taken over)
        or None, blocks the pool gives up: each block of the context but the full ones found, and the found
        ones nobody held, which leave its cached blocks)."""
        found, best, share = pool.match(context, limit, chains)
        reused = len(found) * KV_BLOCK
        partial = None
        if best is not None:
            owned = pool.blocks[best].refs == 0 and pool.blocks[best].chain is None
            if owned or share >= self.min_copy:
                partial, reused = (best, share, owned), reused + share
        given = -(-len(context) // KV_BLOCK) - len(found) + sum(1 for b in found if pool.blocks[b].refs == 0)
        return found, reused, partial, given

    def _take(self, group: int, context: list[int], found: list[int], reused: int,
              partial: tuple[int, int, bool] | None) -> Placement:
        pool = self.pools[group]
        for block in found:
            pool.hold(block)
        blocks, copy = list(found), None
        if partial is not None:
            source, share, owned = partial
            if owned:
                pool.hold(source)
                pool.truncate(source, share)
                blocks.append(source)
            else:  # copy on write: the copy runs before this step writes anything, so `take` may reuse the source
                parent, tokens = pool.blocks[source].parent, pool.blocks[source].tokens[:share]
                target = pool.claim()
                pool.write(target, parent, tokens)
                blocks.append(target)
                copy = (source, target)
        while len(blocks) * KV_BLOCK < len(context):
            blocks.append(pool.claim())
        return Placement(group, blocks, reused, copy)

    def grow(self, group: int, blocks: list[int], striped: bool = False) -> bool:
        """Give a request one more block (its sequence reached the end of its last one): False when the pool
        has none."""
        pool = self.pools[self.owner(group, len(blocks), striped)]
        if not pool.available():
            return False
        blocks.append(pool.claim())
        return True

    def written(self, group: int, blocks: list[int], start: int, tokens: list[int], striped: bool = False) -> None:
        """`tokens` were written at positions start.. of the sequence whose table is `blocks`."""
        while tokens:
            index, offset = divmod(start, KV_BLOCK)
            n = min(len(tokens), KV_BLOCK - offset)
            before = self.pools[self.owner(group, index - 1, striped)]
            parent = before.blocks[blocks[index - 1]].chain if index else ROOT
            self.pools[self.owner(group, index, striped)].write(blocks[index], parent if parent is not None else ROOT,
                                                                tokens[:n])
            start, tokens = start + n, tokens[n:]

    def release(self, group: int, blocks: list[int], striped: bool = False) -> None:
        """A request ended or was preempted: its blocks go back, their contents cached."""
        for index, block in enumerate(blocks):
            self.pools[self.owner(group, index, striped)].release(block)

    def usage(self) -> dict[str, int]:
        """Blocks in all groups: referenced by requests, cached (unreferenced, contents kept), never written."""
        used = sum(1 for p in self.pools for b in p.blocks if b.refs)
        return {"blocks": self.blocks_per_group * len(self.pools), "blocks_used": used,
                "blocks_cached": sum(len(p.cached) for p in self.pools),
                "blocks_free": sum(len(p.unwritten) for p in self.pools)}
