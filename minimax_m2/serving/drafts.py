"""Draft tokens without a draft model: n-gram (prompt lookup) drafts from a request's own prompt and output,
and from the answers of other requests, ended or still running.

The sequence's last n tokens (n from `longest` down to `shortest`) are looked up among its earlier tokens;
the tokens that followed their latest earlier occurrence are the draft. Agents' answers copy long spans of
their prompts (files being edited, tool outputs, earlier turns), which is where such drafts are accepted.
Where its own last `longest` tokens occurred nowhere earlier, a request looks them up among the answers
other requests gave or are giving (`SharedAnswers`, extended token by token): agents retried (while the
first try still runs, after a client's timeout), run in parallel over the same files, or writing the same
tool calls again give the same answers again.
"""

import threading
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

SHORTEST, LONGEST = 2, 4  # n-gram lengths looked up, longest first
RECENT = 0.3  # the weight of a draft's outcome in the running mean of accepted drafts (`expected`)
BULK = 512  # new tokens from which a draft indexes them as one sorted block (150,000 prompt tokens: 44 ms)
SHARED_TOKENS = 1 << 18  # the answers' tokens `SharedAnswers` keeps by default (the oldest answers go first)


_MIX, _MASK = 0x9E3779B97F4A7C15, (1 << 64) - 1  # an n-gram's key: its tokens as digits base _MIX, modulo 2^64


def gram_key(gram: Sequence[int]) -> int:
    """An n-gram's 64-bit key, as `SortedGrams` computes its keys."""
    key = 0
    for token in gram:
        key = (key * _MIX + token) & _MASK
    return key


class SortedGrams:
    """The n-grams of a block of a sequence's tokens, as sorted 64-bit keys: the latest occurrence of an
    n-gram is a binary search away, its tokens compared (keys of different n-grams may collide). A prompt of
    150,000 tokens is indexed in a fifth of the time and a sixth of the memory of a dict of its n-grams."""

    def __init__(self, tokens: Sequence[int], offset: int, start: int, sizes: Sequence[int]):
        """tokens: the sequence's positions offset.. ; the n-grams (n in sizes) ending at positions start.. ."""
        self.tokens, self.offset = np.asarray(tokens, np.int64).astype(np.uint64), offset
        end = offset + len(tokens)
        self.tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for n in sizes:
            low = max(start, offset + n)
            if low >= end:
                continue
            keys = np.zeros(end - low, np.uint64)
            for i in range(n):  # wraps modulo 2^64, as gram_key does
                keys = keys * np.uint64(_MIX) + self.tokens[low - n - offset + i : end - n - offset + i]
            order = np.argsort(keys, kind="stable")  # equal keys stay in position order
            self.tables[n] = keys[order], order + low

    def latest(self, gram: tuple[int, ...]) -> int:
        """The position after the latest occurrence of `gram` in the block, -1 when it has none."""
        table = self.tables.get(len(gram))
        if table is None:
            return -1
        keys, positions = table
        key, n = np.uint64(gram_key(gram)), len(gram)
        i = int(np.searchsorted(keys, key, side="right")) - 1
        while i >= 0 and keys[i] == key:
            after = int(positions[i]) - self.offset
            if tuple(self.tokens[after - n : after].tolist()) == gram:
                return after + self.offset
            i -= 1
        return -1


def windows(tokens: Sequence[int], n: int, low: int, high: int) -> Iterator[tuple[int, ...]]:
    """The n-grams tokens[p - n : p] for p in low .. high - 1 (low >= n), as tuples."""
    return zip(*(tokens[low - n + i : high - n + i] for i in range(n)))


def periodic(span: list[int], k: int) -> list[int]:
    """The k tokens that continue a sequence ending in a repeat of its suffix `span` (the tokens after the
    latest earlier occurrence of its last n-gram, up to its end): `span` again and again when shorter than k
    (a latest occurrence overlapping the end: a token or a line repeated)."""
    return (span * -(-k // len(span)))[:k] if span else []


class SharedAnswers:
    """The answers of requests, ended or still running, each after the last `longest - 1` tokens of its
    prompt, indexed by their `longest`-token n-grams as the tokens come: draft(tokens, k) -> up to k tokens
    that followed the latest occurrence of the last `longest` tokens in any answer kept. Keeps at most
    `capacity` tokens, dropping the oldest answers (a running one's further tokens are then not kept).
    A request's answer is opened where it is submitted (a client's thread) and extended and looked up on the
    engine's thread: what changes the kept answers holds a lock."""

    def __init__(self, capacity: int = SHARED_TOKENS, longest: int = LONGEST):
        self.capacity, self.n = capacity, longest
        self._answers: dict[int, list[int]] = {}  # serial -> the answer, after its prompt's last n - 1 tokens
        self._order: deque[int] = deque()  # serials, oldest first
        self._latest: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (serial, the position after it)
        self._serial = self.tokens = self.hits = 0
        self._lock = threading.Lock()

    def open(self, prompt: Sequence[int]) -> int:
        """A request started with `prompt`: the serial its answer's tokens are kept under (`extend`)."""
        tokens = list(prompt[max(0, len(prompt) - self.n + 1):])
        with self._lock:
            serial = self._serial = self._serial + 1
            self._answers[serial] = tokens
            self._order.append(serial)
            self.tokens += len(tokens)
        return serial

    def extend(self, serial: int, answer: Sequence[int]) -> None:
        """The request kept under `serial` answered these tokens next: each n-gram they complete indexed to the
        token after it (an n-gram is indexed once its next token is known)."""
        with self._lock:
            tokens = self._answers.get(serial)
            if tokens is None or not answer:
                return
            start = max(self.n, len(tokens))
            tokens.extend(answer)
            self.tokens += len(answer)
            ends = range(start, len(tokens))
            self._latest.update(zip(windows(tokens, self.n, start, len(tokens)), ((serial, end) for end in ends)))
            while self.tokens > self.capacity and len(self._order) > 1:
                self._drop(self._order.popleft())

    def add(self, prompt: Sequence[int], answer: Sequence[int]) -> None:
        """A request answered `answer` to `prompt` (kept whole, as `open` then `extend`)."""
        if answer:
            self.extend(self.open(prompt), answer)

    def _drop(self, serial: int) -> None:
        tokens = self._answers.pop(serial)
        self.tokens -= len(tokens)
        for key in windows(tokens, self.n, self.n, len(tokens)):
            if self._latest.get(key, (0,))[0] == serial:
                del self._latest[key]

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the last `longest` of `tokens` in the latest answer holding them."""
        if k < 1 or len(tokens) < self.n:
            return []
        found = self._latest.get(tuple(tokens[len(tokens) - self.n:]))
        if found is None:
            return []
        serial, end = found
        self.hits += 1
        return self._answers[serial][end:end + k]


class NgramDrafter:
    """One request's n-gram index over its tokens, extended as they come: draft(tokens, k) -> up to k tokens;
    and its drafts' record: how many to propose next (`k`: one more than the last draft had accepted, at most
    `limit`), and how many a draft is expected to have accepted (`expected`: a running mean). A draft a step
    verifies is scored by the verification; one a step does not verify is watched and scored by the tokens
    that follow it (`watch`, `followed`), so that the record stays current while drafts are not verified."""

    def __init__(self, limit: int, shortest: int = SHORTEST, longest: int = LONGEST,
                 shared: SharedAnswers | None = None, bulk: int = BULK, prompt: Sequence[int] = ()):
        """shared: the answers this request drafts from, and keeps its own among (after `prompt`, token by
        token as `followed` hears them)."""
        if shared is not None and shared.n != longest:
            raise ValueError(f"shared answers indexed by {shared.n}-grams, drafts looked up from {longest}")
        self.sizes, self.shared = range(longest, shortest - 1, -1), shared
        self._serial = shared.open(prompt) if shared is not None else 0
        self.limit = self.k = limit
        self.expected = float(limit)  # hopeful until drafts are scored
        self._latest: dict[tuple[int, ...], int] = {}  # an n-gram -> the position after its latest occurrence
        self._blocks: list[SortedGrams] = []  # the n-grams of what came `bulk` tokens or more at once
        self._indexed, self.bulk = 0, bulk  # positions p < _indexed have their n-grams ending at p indexed
        self._watched: list[int] = []  # a draft not verified, matched against the tokens that follow
        self._matched = 0

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (of
        `shortest` to `longest` tokens) seen before, the shared answers looked up after its own `longest`
        tokens and before its shorter suffixes; [] when none was seen."""
        end = len(tokens)
        first = max(0, self._indexed - self.sizes[0])
        fresh = tokens[first:end]  # the tokens the new n-grams span, read once
        if end - self._indexed >= self.bulk:
            self._blocks.append(SortedGrams(fresh, first, self._indexed, self.sizes))
        else:
            for n in self.sizes:  # the n-grams ending at positions start.., each to that position (the latest wins)
                start = max(self._indexed, n)
                self._latest.update(zip(windows(fresh, n, start - first, end - first), range(start, end)))
        self._indexed = max(self._indexed, end)
        if k < 1:
            return []
        for n in self.sizes:
            if end > n:
                gram = tuple(tokens[end - n:])
                follower = max([self._latest.get(gram, -1)] + [block.latest(gram) for block in self._blocks])
                if 0 <= follower < end:
                    return periodic(tokens[follower:follower + k], k)
            if n == self.sizes[0] and self.shared is not None:
                found = self.shared.draft(tokens, k)
                if found:
                    return found
        return []

    def scored(self, accepted: int) -> None:
        """A draft had its first `accepted` tokens accepted (by a verify step, or by the tokens that followed)."""
        self.k = min(self.limit, accepted + 1)
        self.expected += RECENT * (accepted - self.expected)

    def watch(self, draft: list[int]) -> None:
        """A draft the step does not verify: scored by the tokens that follow (unless one is watched already)."""
        if draft and not self._watched:
            self._watched, self._matched = list(draft), 0

    def followed(self, token: int) -> None:
        """The request's next token: kept among the shared answers, and the watched draft's next token or not."""
        if self.shared is not None:
            self.shared.extend(self._serial, (token,))
        if not self._watched:
            return
        if token == self._watched[self._matched]:
            self._matched += 1
            if self._matched < len(self._watched):
                return
        self.scored(self._matched)
        self._watched = []
