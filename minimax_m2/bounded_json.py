"""JSON from users, from files and from the model, decoded within bounds: nesting depth checked before the decoder
recurses, and every string valid Unicode (no lone surrogates from `\\ud800`-style escapes).

Python's decoder recurses once per nesting level, so a body nested thousands deep raises RecursionError
(and one a few hundred deep can still exhaust the stack later, in a template or a parser); a lone
surrogate decodes to a str that no tokenizer or encoder accepts. Every place that decodes JSON it did
not write goes through `loads`."""

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64  # arrays and objects inside each other, the body itself counted as one

# a JSON string literal (escapes included), unrolled so that a long string is one match
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STEP = np.zeros(256, np.int32)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


class JSONInputError(ValueError):
    """JSON refused: not JSON, nested too deeply, or holding text that is not Unicode (`path`: where, as
    'messages[0].content', or '' for the whole text)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text, found without recursion (strings skipped)."""
    brackets = _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    return int(np.cumsum(_STEP[np.frombuffer(brackets, np.uint8)]).max(initial=0))


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads within the bounds above; JSONInputError names what is wrong."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise JSONInputError(f"not UTF-8: {err}") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JSONInputError(f"nested {depth} levels deep; at most {max_depth} levels of arrays and objects are "
                             "accepted")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise JSONInputError(f"not valid JSON: {err}") from None
    path = lone_surrogate(value)
    if path is not None:
        raise JSONInputError(f"{path or 'the text'} holds a lone surrogate (an escape like \\ud800 without its "
                             "pair): not valid Unicode", path)
    return value


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path ('tools[0].function.name') of the first string or key in a decoded JSON value that is not
    valid Unicode, or None."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    if isinstance(value, str):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{path}.{key}".lstrip(".") if isinstance(key, str) else f"{path}[{key}]"
        if isinstance(key, str) and lone_surrogate(key) is not None:
            return inner
        found = lone_surrogate(item, inner)
        if found is not None:
            return found
    return None
