"""Text from token ids as they are generated: pieces that split a multi-byte character wait for the rest."""


class IncrementalDetokenizer:
    """feed(id) -> the text this token completes ('' while a character is still split)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab_size()
        self.ids: list[int] = []
        self.unknown: list[int] = []
        self._emitted = 0

    def feed(self, token: int) -> str:
        if not 0 <= token < self.vocab:
            self.unknown.append(token)
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self._emitted = text[self._emitted:], len(text)
        return new
