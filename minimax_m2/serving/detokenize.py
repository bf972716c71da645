"""Text from token ids as they are generated: pieces that split a multi-byte character wait for the rest."""


class IncrementalDetokenizer:
    """feed(id) -> the text this token completes ('' while a character is still split).

    Each call decodes only the tokens since the last complete character (a window, not the whole
    output), so a long generation costs the same per token as a short one."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab_size()
        self.ids: list[int] = []
        self.unknown: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already returned
        self._read = 0

    def feed(self, token: int) -> str:
        if not 0 <= token < self.vocab:
            self.unknown.append(token)
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]
