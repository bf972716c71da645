"""Draft tokens without a draft model: n-gram (prompt lookup) drafts from a request's own prompt and output,
and from the answers of requests that ended before it.

The sequence's last n tokens (n from `longest` down to `shortest`) are looked up among its earlier tokens;
the tokens that followed their latest earlier occurrence are the draft. Agents' answers copy long spans of
their prompts (files being edited, tool outputs, earlier turns), which is where such drafts are accepted.
Where its own tokens hold no match, a request looks up its last `longest` tokens among the answers other
requests gave (`SharedAnswers`): agents retried, run in parallel over the same files, or writing the same
tool calls again give the same answers again.
"""

from collections import deque
from collections.abc import Sequence

SHORTEST, LONGEST = 2, 4  # n-gram lengths looked up, longest first
RECENT = 0.3  # the weight of a draft's outcome in the running mean of accepted drafts (`expected`)
SHARED_TOKENS = 1 << 18  # the answers' tokens `SharedAnswers` keeps by default (the oldest answers go first)


class SharedAnswers:
    """The answers of ended requests, each after the last `longest - 1` tokens of its prompt, indexed by their
    `longest`-token n-grams: draft(tokens, k) -> up to k tokens that followed the latest occurrence of the
    last `longest` tokens in any answer kept. Keeps at most `capacity` tokens, dropping the oldest answers."""

    def __init__(self, capacity: int = SHARED_TOKENS, longest: int = LONGEST):
        self.capacity, self.n = capacity, longest
        self._answers: dict[int, list[int]] = {}  # serial -> the answer, after its prompt's last n - 1 tokens
        self._order: deque[int] = deque()  # serials, oldest first
        self._latest: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (serial, the position after it)
        self._serial = self.tokens = self.hits = 0

    def add(self, prompt: Sequence[int], answer: Sequence[int]) -> None:
        """A request ended, having answered `answer` to `prompt`."""
        if not answer:
            return
        tokens = list(prompt[len(prompt) - min(len(prompt), self.n - 1):]) + list(answer)
        serial = self._serial = self._serial + 1
        self._answers[serial] = tokens
        self._order.append(serial)
        self.tokens += len(tokens)
        for end in range(self.n, len(tokens)):
            self._latest[tuple(tokens[end - self.n:end])] = (serial, end)
        while self.tokens > self.capacity and len(self._order) > 1:
            self._drop(self._order.popleft())

    def _drop(self, serial: int) -> None:
        tokens = self._answers.pop(serial)
        self.tokens -= len(tokens)
        for end in range(self.n, len(tokens)):
            key = tuple(tokens[end - self.n:end])
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
                 shared: SharedAnswers | None = None):
        self.sizes, self.shared = range(longest, shortest - 1, -1), shared
        self.limit = self.k = limit
        self.expected = float(limit)  # hopeful until drafts are scored
        self._latest: dict[tuple[int, ...], int] = {}  # an n-gram -> the position after its latest occurrence
        self._indexed = 0  # positions p < this have their n-grams ending at p indexed
        self._watched: list[int] = []  # a draft not verified, matched against the tokens that follow
        self._matched = 0

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (of
        `shortest` to `longest` tokens) seen before; else what the shared answers draft; [] when neither has
        one."""
        end = len(tokens)
        first = max(0, self._indexed - self.sizes[0])
        fresh = tokens[first:end]  # the tokens the new n-grams span, read once
        for position in range(self._indexed, end):  # n-grams ending before the last position, which has no follower
            for n in self.sizes:
                if position >= n:
                    self._latest[tuple(fresh[position - n - first:position - first])] = position
        self._indexed = max(self._indexed, end)
        if k < 1:
            return []
        for n in self.sizes:
            if end > n:
                follower = self._latest.get(tuple(tokens[end - n:]))
                if follower is not None and follower < end:
                    return tokens[follower:follower + k]
        return self.shared.draft(tokens, k) if self.shared is not None else []

    def answered(self, prompt: Sequence[int], answer: Sequence[int]) -> None:
        """The request ended with `answer`: kept among the shared answers, for the requests that follow."""
        if self.shared is not None:
            self.shared.add(prompt, answer)

    def scored(self, accepted: int) -> None:
        """A draft had its first `accepted` tokens accepted (by a verify step, or by the tokens that followed)."""
        self.k = min(self.limit, accepted + 1)
        self.expected += RECENT * (accepted - self.expected)

    def watch(self, draft: list[int]) -> None:
        """A draft the step does not verify: scored by the tokens that follow (unless one is watched already)."""
        if draft and not self._watched:
            self._watched, self._matched = list(draft), 0

    def followed(self, token: int) -> None:
        """The request's next token: the watched draft's next token or not."""
        if not self._watched:
            return
        if token == self._watched[self._matched]:
            self._matched += 1
            if self._matched < len(self._watched):
                return
        self.scored(self._matched)
        self._watched = []
