"""Constrained decoding with llguidance: a request's grammar as a matcher, advanced token by token, and the
token masks of a step's constrained rows computed together.

A constraint starts once the model's reasoning has ended (its output holds </think>), or at once when the
prompt did not open reasoning. While the reasoning lasts the row may choose anything but end-of-sequence
(a constrained reply never ends inside its reasoning); then every token is one the grammar allows, and the
request ends as soon as the grammar is complete. Masks are llguidance's packed int32 bitmasks over the
model's vocabulary ([rows, ceil(V / 32)], bit j of word w allowing token 32 w + j); tokens past the
tokenizer's (the model's padding) are never allowed.
"""

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par

from kernels.token_mask import BIT_VALUES
from minimax_m2.device.step import mask_words
from minimax_m2.serving.grammars import GrammarError
from minimax_m2.serving.parsers import THINK_CLOSE

_END = THINK_CLOSE.encode()


class Grammars:
    """The grammar engine over one tokenizer (a `tokenizers.Tokenizer`) and model: compiles grammars into
    matchers and computes masks on a thread of its own (llguidance's own threads underneath)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.vocab_size, self.eos = vocab_size, tuple(eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                                eos_token=list(self.eos) or None)
        # without end-of-sequence ids llguidance still names one: it is never allowed (a complete grammar ends
        # the request instead)
        self._not_eos = [] if self.eos else list(self.tokenizer.eos_tokens)
        self._parallel = llguidance.LLExecutor()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="masks")
        self._lock = threading.Lock()
        self.stats = {"mask_seconds": 0.0, "masked_rows": 0, "masked_steps": 0}
        reasoning = np.full(mask_words(vocab_size) * 32, 1, np.uint8)
        reasoning[list(self.eos)] = 0
        reasoning[tokenizer.get_vocab_size():] = 0
        self.reasoning_mask = np.packbits(reasoning, bitorder="little").view(np.int32)  # anything but the end

    def compile(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher of a Lark grammar (`minimax_m2.serving.grammars`); a GrammarError saying why it is refused."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error().strip().splitlines()[0])
        return matcher

    def constraint(self, matcher: llguidance.LLMatcher, reasoning_open: bool) -> "Constraint":
        """A request's own constraint from a compiled matcher (copied: every choice advances its own)."""
        return Constraint(self, matcher.deep_copy(), reasoning_open)

    def masks(self, constraints: list["Constraint"], rows: int) -> Future:
        """The next token's masks of the constraints, [rows, ceil(V / 32)] int32 (rows past them forbid
        everything), computed on the worker thread."""
        return self._worker.submit(self._fill, constraints, rows)

    def _fill(self, constraints: list["Constraint"], rows: int) -> np.ndarray:
        start = time.perf_counter()
        masks = np.zeros((rows, mask_words(self.vocab_size)), np.int32)
        active = [(c.matcher, row) for row, c in enumerate(constraints) if c.active]
        if active:
            fill_next_token_bitmask_par(self._parallel, active, masks)
            for token in self._not_eos:
                masks[:, token // 32] &= ~BIT_VALUES[token % 32]
        for row, c in enumerate(constraints):
            if not c.active:
                masks[row] = self.reasoning_mask
        with self._lock:
            self.stats["mask_seconds"] += time.perf_counter() - start
            self.stats["masked_rows"] += len(constraints)
            self.stats["masked_steps"] += 1
        return masks


class Constraint:
    """One request's grammar: free but for the end while its reasoning lasts, then held to its matcher."""

    def __init__(self, grammars: Grammars, matcher: llguidance.LLMatcher, reasoning_open: bool):
        self.grammars, self.matcher = grammars, matcher
        self.active = not reasoning_open
        self._tail = b""  # the reasoning's last bytes, where </think> may have begun

    def advance(self, token: int) -> bool:
        """Take the request's next token; False when the grammar refuses it (the reply cannot be completed)."""
        if self.active:
            return self.matcher.consume_token(token)
        text = self._tail + self.grammars.tokenizer.decode_bytes([token])
        at = text.find(_END)
        if at < 0:
            self._tail = text[-(len(_END) - 1):]
            return True
        self.active = True
        rest = text[at + len(_END):]
        return not rest or self.matcher.consume_tokens(self.grammars.tokenizer.tokenize_bytes(rest))

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more (the request can end)."""
        return self.active and self.matcher.is_stopped()
