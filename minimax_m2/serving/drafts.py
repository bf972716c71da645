"""Draft tokens without a draft model: n-gram (prompt lookup) drafts from a request's own prompt and output.

The sequence's last n tokens (n from `longest` down to `shortest`) are looked up among its earlier tokens;
the tokens that followed their latest earlier occurrence are the draft. Agents' answers copy long spans of
their prompts (files being edited, tool outputs, earlier turns), which is where such drafts are accepted.
"""

SHORTEST, LONGEST = 2, 4  # n-gram lengths looked up, longest first


class NgramDrafter:
    """One request's n-gram index over its tokens, extended as they come: draft(tokens, k) -> up to k tokens."""

    def __init__(self, shortest: int = SHORTEST, longest: int = LONGEST):
        self.sizes = range(longest, shortest - 1, -1)
        self._latest: dict[tuple[int, ...], int] = {}  # an n-gram -> the position after its latest occurrence
        self._indexed = 0  # positions p < this have their n-grams ending at p indexed

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens` (of
        `shortest` to `longest` tokens) seen before; [] when none was."""
        end = len(tokens)
        for position in range(self._indexed, end):  # n-grams ending before the last position, which has no follower
            for n in self.sizes:
                if position >= n:
                    self._latest[tuple(tokens[position - n:position])] = position
        self._indexed = max(self._indexed, end)
        if k < 1:
            return []
        for n in self.sizes:
            if end > n:
                follower = self._latest.get(tuple(tokens[end - n:]))
                if follower is not None and follower < end:
                    return tokens[follower:follower + k]
        return []
