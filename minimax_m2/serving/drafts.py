"""Draft tokens without a draft model: n-gram (prompt lookup) drafts from a request's own prompt and output.

The sequence's last n tokens (n from `longest` down to `shortest`) are looked up among its earlier tokens;
the tokens that followed their latest earlier occurrence are the draft. Agents' answers copy long spans of
their prompts (files being edited, tool outputs, earlier turns), which is where such drafts are accepted.
"""

from collections.abc import Sequence

SHORTEST, LONGEST = 2, 4  # n-gram lengths looked up, longest first
RECENT = 0.3  # the weight of a draft's outcome in the running mean of accepted drafts (`expected`)


class NgramDrafter:
    """One request's n-gram index over its tokens, extended as they come: draft(tokens, k) -> up to k tokens;
    and its drafts' record: how many to propose next (`k`: one more than the last draft had accepted, at most
    `limit`), and how many a draft is expected to have accepted (`expected`: a running mean). A draft a step
    verifies is scored by the verification; one a step does not verify is watched and scored by the tokens
    that follow it (`watch`, `followed`), so that the record stays current while drafts are not verified."""

    def __init__(self, limit: int, shortest: int = SHORTEST, longest: int = LONGEST):
        self.sizes = range(longest, shortest - 1, -1)
        self.limit = self.k = limit
        self.expected = float(limit)  # hopeful until drafts are scored
        self._latest: dict[tuple[int, ...], int] = {}  # an n-gram -> the position after its latest occurrence
        self._indexed = 0  # positions p < this have their n-grams ending at p indexed
        self._watched: list[int] = []  # a draft not verified, matched against the tokens that follow
        self._matched = 0

    def draft(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (of
        `shortest` to `longest` tokens) seen before; [] when none was."""
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
        """The request's next token: the watched draft's next token or not."""
        if not self._watched:
            return
        if token == self._watched[self._matched]:
            self._matched += 1
            if self._matched < len(self._watched):
                return
        self.scored(self._matched)
        self._watched = []
