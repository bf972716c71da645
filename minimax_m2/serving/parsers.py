"""Splitting MiniMax-M2's output into reasoning, content and tool calls, incrementally.

Reasoning is the text between <think> and </think>; with M2's generation prompt the reasoning is
already open, so the output starts inside it and shows only </think>. Tool calls are
<minimax:tool_call> blocks of <invoke name="..."> elements with <parameter name="..."> values, typed by
the tool's JSON schema. Both parsers take text piece by piece (one token at a time, say): text that
could still be the start of a tag is held back until the next piece decides it.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any

from minimax_m2 import bounded_json

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"
_INVOKE = re.compile(r'<invoke name="([^"]*)">(.*?)</invoke>', re.DOTALL)
_PARAMETER = re.compile(r'<parameter name="([^"]*)">(.*?)</parameter>', re.DOTALL)


def _held(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (kept back for now)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _segments(text: str, inside: bool, open_tag: str, close_tag: str) -> tuple[list[tuple[bool, str]], str, bool]:
    """`text` cut at alternating tags (close_tag first when `inside`): the completed segments as
    (inside, text), the text after the last tag, and whether that text is inside."""
    segments = []
    while (at := text.find(close_tag if inside else open_tag)) >= 0:
        segments.append((inside, text[:at]))
        text = text[at + len(close_tag if inside else open_tag):]
        inside = not inside
    return segments, text, inside


class ReasoningParser:
    """feed(text) -> (reasoning, content) released so far by this piece. The newlines that follow
    </think> are dropped from the content. Without `reopen`, reasoning never starts again once it ended
    (or when the output did not start in it): a constrained answer holding <think> is all content."""

    def __init__(self, reasoning_open: bool = True, reopen: bool = True):
        self.inside = reasoning_open
        self._pending = ""
        self._after_close = False
        self._reopen = reopen

    def _content(self, text: str) -> str:
        if self._after_close:
            text = text.lstrip("\n")
            self._after_close = not text
        return text

    def feed(self, text: str) -> tuple[str, str]:
        if not self._reopen:
            return self._feed_once(self._pending + text)
        reasoning, content = [], []
        segments, pending, self.inside = _segments(self._pending + text, self.inside, THINK_OPEN, THINK_CLOSE)
        for inside, segment in segments:
            if inside:
                reasoning.append(segment)
                self._after_close = True
            else:
                content.append(self._content(segment))
        keep = _held(pending, THINK_CLOSE if self.inside else THINK_OPEN)
        out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        if self.inside:
            reasoning.append(out)
        else:
            content.append(self._content(out))
        return "".join(reasoning), "".join(content)

    def _feed_once(self, text: str) -> tuple[str, str]:
        """feed without `reopen`: everything after the first </think> is content."""
        self._pending = ""
        if not self.inside:
            return "", self._content(text)
        at = text.find(THINK_CLOSE)
        if at >= 0:
            self.inside, self._after_close = False, True
            return text[:at], self._content(text[at + len(THINK_CLOSE):])
        keep = _held(text, THINK_CLOSE)
        self._pending = text[len(text) - keep:]
        return text[:len(text) - keep], ""

    def finish(self) -> tuple[str, str]:
        rest, self._pending = self._pending, ""
        return (rest, "") if self.inside else ("", self._content(rest))


def _typed(value: str, schema: dict) -> Any:
    """A parameter's text as its JSON-schema type: string as is, integer/number parsed, boolean
    true/1, object/array as JSON, null as None; text that does not parse stays text."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    text = value.strip()
    if text == "null" and ("null" in kinds or "string" not in kinds):
        return None
    try:
        if "string" in kinds:
            return value
        if "integer" in kinds:
            return int(text)
        if "number" in kinds:
            number = float(text)
            return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
        if "boolean" in kinds:
            return text.lower() in ("true", "1")
        if "object" in kinds or "array" in kinds or kind is None:
            return bounded_json.loads(text)
    except ValueError:
        pass
    return value


def parse_invokes(block: str, tools: list[dict] | None) -> list[dict]:
    """The <invoke> elements of one tool-call block -> OpenAI tool_calls (arguments as a JSON string)."""
    schemas = {}
    for tool in tools or []:
        function = tool.get("function", tool)
        schemas[function["name"]] = (function.get("parameters") or {}).get("properties") or {}
    calls = []
    for name, body in _INVOKE.findall(block):
        properties = schemas.get(name, {})
        arguments = {key: _typed(value.strip("\n"), properties.get(key, {})) for key, value in _PARAMETER.findall(body)}
        calls.append({"type": "function", "function": {"name": name,
                                                       "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return calls


class ToolCallParser:
    """feed(content) -> (content outside tool-call blocks, tool calls completed by this piece)."""

    def __init__(self, tools: list[dict] | None = None):
        self.tools = tools
        self._pending = ""
        self._inside = False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        content, calls = [], []
        segments, pending, self._inside = _segments(self._pending + text, self._inside, CALL_OPEN, CALL_CLOSE)
        for inside, segment in segments:
            if inside:
                calls.extend(parse_invokes(segment, self.tools))
            else:
                content.append(segment)
        if self._inside:
            self._pending = pending
        else:
            keep = _held(pending, CALL_OPEN)
            content.append(pending[: len(pending) - keep])
            self._pending = pending[len(pending) - keep:]
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict]]:
        """End of output: an unterminated block still yields its complete <invoke> elements."""
        rest, self._pending = self._pending, ""
        if self._inside:
            return "", parse_invokes(rest, self.tools)
        return rest, []


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)


class OutputParser:
    """Reasoning, then tool calls within the content: feed(text) -> ParsedOutput of what this piece released."""

    def __init__(self, tools: list[dict] | None = None, reasoning_open: bool = True, calls: bool = True,
                 reopen: bool = True):
        """calls: look for tool calls in the content (not in a JSON answer); reopen: see `ReasoningParser`."""
        self.reasoning = ReasoningParser(reasoning_open, reopen)
        self.calls = ToolCallParser(tools) if calls else None

    def feed(self, text: str) -> ParsedOutput:
        reasoning, content = self.reasoning.feed(text)
        if self.calls is None:
            return ParsedOutput(reasoning, content)
        content, calls = self.calls.feed(content)
        return ParsedOutput(reasoning, content, calls)

    def finish(self) -> ParsedOutput:
        reasoning, content = self.reasoning.finish()
        if self.calls is None:
            return ParsedOutput(reasoning, content)
        content, calls = self.calls.feed(content)
        rest, more = self.calls.finish()
        return ParsedOutput(reasoning, content + rest, calls + more)


def parse_output(text: str, tools: list[dict] | None = None, reasoning_open: bool = True) -> ParsedOutput:
    """The whole output at once."""
    parser = OutputParser(tools, reasoning_open)
    first, last = parser.feed(text), parser.finish()
    return ParsedOutput(first.reasoning + last.reasoning, first.content + last.content,
                        first.tool_calls + last.tool_calls)
