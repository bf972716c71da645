"""From a request's tokens to OpenAI response fields: text deltas (detokenized, split into reasoning,
content and tool calls, cut at stop strings), log-probabilities in each endpoint's format, and a whole
choice."""

import codecs
import uuid
from dataclasses import dataclass, field

from minimax_m2.sampling import TokenLogprobs
from minimax_m2.serving.detokenize import IncrementalDetokenizer
from minimax_m2.serving.openai_request import Parsed
from minimax_m2.serving.parsers import OutputParser, ParsedOutput
from minimax_m2.serving.served import ServedModel

Scored = tuple[int, TokenLogprobs]  # a new token and its log-probabilities


@dataclass
class Delta:
    """What one token (or the end) adds to a response."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] | None = None
    finish_reason: str | None = None
    logprobs: list[Scored] = field(default_factory=list)  # of the tokens since the previous delta, when asked


class TextStream:
    """A request's tokens as deltas: detokenized, cut at the first stop string met anywhere in the output
    (reasoning included, as vLLM matches the whole output; `stopped` then turns true), and for chat split
    into reasoning / content / tool calls. Text that may begin a stop string is held until it cannot."""

    def __init__(self, served: ServedModel, parsed: Parsed):
        self.detokenizer = IncrementalDetokenizer(served.tokenizer)
        json_answer = parsed.structure is not None and parsed.structure.json
        self.parser = OutputParser(parsed.tools, parsed.reasoning_open, calls=not json_answer,
                                   reopen=parsed.structure is None) if parsed.chat else None
        self.stop, self.eos = parsed.stop, set(parsed.sampling.eos_token_ids)
        self.held, self.calls, self.stopped = "", 0, False  # held: text not yet parsed

    def token(self, token: int) -> Delta | None:
        if token in self.eos:
            return None
        self.held += self.detokenizer.feed(token)
        cut = min((self.held.find(s) for s in self.stop if s in self.held), default=-1)
        if cut >= 0:
            self.held, self.stopped = self.held[:cut], True
        keep = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        split = max(0, len(self.held) - keep)
        text, self.held = self.held[:split], self.held[split:]
        parts = self._parse(text)
        if parts.reasoning or parts.content or parts.tool_calls:
            return Delta(parts.reasoning, parts.content, parts.tool_calls or None)
        return None

    def _parse(self, text: str, last: bool = False) -> ParsedOutput:
        if not self.parser:
            return ParsedOutput(content=text)
        parts = self.parser.feed(text)
        if last:
            rest = self.parser.finish()
            parts = ParsedOutput(parts.reasoning + rest.reasoning, parts.content + rest.content,
                                 parts.tool_calls + rest.tool_calls)
        self.calls += len(parts.tool_calls)
        return parts

    def finish(self, reason: str) -> list[Delta]:
        """The rest of the text, then the finish reason (tool_calls when calls were made)."""
        if not self.stopped:
            self.held += self.detokenizer.flush()
        rest, self.held = self._parse(self.held, last=True), ""
        deltas = []
        if rest.reasoning or rest.content or rest.tool_calls:
            deltas.append(Delta(rest.reasoning, rest.content, rest.tool_calls or None))
        deltas.append(Delta(finish_reason="tool_calls" if self.calls else "stop" if self.stopped else reason))
        return deltas


def with_scored(deltas: list[Delta], scored: list[Scored]) -> list[Delta]:
    """The last deltas of a choice, the first carrying the log-probabilities no delta has carried yet."""
    deltas[0].logprobs = scored + deltas[0].logprobs
    return deltas


class TextOffsets:
    """Completions' `text_offset`: where each token's text starts in a choice's text, counted in characters
    of what the tokens so far decode to (a token that ends inside a character starts where that character
    does), at most `limit` (the returned text's length, which a stop string may have cut)."""

    def __init__(self, limit: int | None = None):
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars, self.limit = 0, limit

    def starts(self, pieces: list[bytes]) -> list[int]:
        starts = []
        for piece in pieces:
            starts.append(self.chars if self.limit is None else min(self.chars, self.limit))
            self.chars += len(self.decoder.decode(piece))
        return starts


def logprobs_field(served: ServedModel, parsed: Parsed, scored: list[Scored], offsets: TextOffsets) -> dict | None:
    """A choice's (or chunk's) `logprobs` in the endpoint's format (None when not asked for): chat's
    {"content": [{token, logprob, bytes, top_logprobs}]}, `bytes` each token's own (a character split over
    tokens has its bytes in each), or completions' {tokens, token_logprobs, top_logprobs, text_offset}. A
    token is spelled by its text, or `bytes:\\x..` when its bytes are not whole UTF-8 (`TokenBytes`), so
    that completions' top_logprobs, keyed by spelling, keep every alternative."""
    if parsed.sampling.logprobs is None:
        return None
    spell = served.token_bytes.spell
    if parsed.chat:
        def entry(token: int, logprob: float) -> dict:
            return {"token": spell(token), "logprob": logprob, "bytes": list(served.token_bytes.bytes_of(token))}

        return {"content": [{**entry(token, logprob), "top_logprobs": [entry(i, v) for i, v in top]}
                            for token, (logprob, top) in scored]}
    return {"tokens": [spell(token) for token, _ in scored],
            "token_logprobs": [logprob for _, (logprob, _) in scored],
            "top_logprobs": [{spell(i): v for i, v in top} for _, (_, top) in scored],
            "text_offset": offsets.starts([served.token_bytes.bytes_of(token) for token, _ in scored])}


def whole_choice(index: int, whole: Delta, chat: bool, logprobs: dict | None) -> dict:
    """A non-streamed response's choice from all its deltas added up."""
    if not chat:
        return {"index": index, "text": whole.content, "logprobs": logprobs, "finish_reason": whole.finish_reason}
    calls = whole.tool_calls
    message = {"role": "assistant", "content": whole.content or (None if calls else ""),
               "reasoning_content": whole.reasoning or None}
    if calls:
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:12]}", **c} for c in calls]
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": whole.finish_reason}
