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
        return self._release(text)

    def flush(self) -> str:
        """At the end: the text still held (a character never completed becomes U+FFFD)."""
        return self._release(self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=False))

    def _release(self, text: str) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before):]


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the printable character that stands for each byte in a vocabulary
    entry. Bytes that print as themselves keep their code point; the others take 256, 257, ... in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + extra)] = byte
            extra += 1
    return alphabet


_ALPHABET = _byte_level_alphabet()


class TokenBytes:
    """A token's own bytes (`bytes_of`), which for a token that splits a multi-byte character are not text, and
    its spelling (`spell`): its text when its bytes are whole UTF-8, else `bytes:\\xe4\\xbd` (as OpenAI spells
    such tokens), so that two partial tokens never share a spelling."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, token: int) -> bytes:
        if token not in self._cache:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = text.encode("utf-8")
            if "\ufffd" in text:  # a character split over tokens: its bytes come from the vocabulary entry
                piece = self.tokenizer.id_to_token(token) or ""
                candidates = [bytes(_ALPHABET[c] for c in piece)] if all(c in _ALPHABET for c in piece) else []
                if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte-fallback tokens
                    candidates.append(bytes.fromhex(piece[3:5]))
                raw = next((c for c in candidates if c.decode("utf-8", "replace") == text), raw)
            self._cache[token] = raw
        return self._cache[token]

    def spell(self, token: int) -> str:
        raw = self.bytes_of(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
