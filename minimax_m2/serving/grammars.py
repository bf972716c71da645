"""The grammars of constrained answers, as llguidance Lark text: a JSON value of a schema, MiniMax-M2's tool
calls with each parameter typed by its tool's schema, or any text without a tool call.

An answer may follow up to two newlines (what the model writes after </think>). JSON is written compactly
with a space after each separator (`{"a": 1, "b": [2, 3]}`), so that its length is bounded by the schema's.

A tool call is the model's own format, one block of invokes:

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

each parameter written as `minimax_m2.serving.parsers.parse_invokes` reads it back: a string-typed one as
its raw text (no newline at either end, and none of the closing tags), held to its schema's enum, const,
length and pattern; any other as JSON of its schema. Required parameters come in the schema's order, each
optional one may be left out.
"""

import json
from typing import Any

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LEAD = r'/\n{0,2}/'
CALL_OPEN, CALL_CLOSE = "<minimax:tool_call>\n", "</minimax:tool_call>"
PARAM_CLOSE, INVOKE_CLOSE = "</parameter>\n", "</invoke>\n"
TAGS = ("</parameter>", "</invoke>", "</minimax:tool_call>")  # what a raw string value never holds
_TAG_REGEXES = tuple(tag.replace("/", "\\/") for tag in TAGS)


class GrammarError(ValueError):
    """A schema or tool this server cannot turn into a grammar: the message names what."""


def _literal(text: str) -> str:
    return json.dumps(text)


def _json(schema: Any) -> str:
    """`%json` of a schema, with the compact style (the schema's own x-guidance options kept)."""
    if schema is True or schema == {}:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {schema!r:.60}")
    style = dict(JSON_STYLE, **schema.get("x-guidance", {})) if isinstance(schema.get("x-guidance", {}), dict) \
        else JSON_STYLE
    return "%json " + json.dumps({**schema, "x-guidance": style})


def json_answer(schema: dict | None) -> str:
    """A JSON value of `schema` (None: any JSON object)."""
    return f"start: {LEAD} answer\nanswer: {_json({'type': 'object'} if schema is None else schema)}\n"


def text_without_calls() -> str:
    """Any text in which no tool-call block starts."""
    return "start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*)<minimax:tool_call>(?s:.*)/\n"


def _pattern(pattern: str) -> str:
    """A JSON schema's `pattern` (matched anywhere unless anchored) as a Lark regex matching the whole value."""
    from llguidance import regex_to_lark

    body = pattern[1:] if pattern.startswith("^") else "(?s:.*)" + pattern
    body = body[:-1] if body.endswith("$") and not body.endswith("\\$") else body + "(?s:.*)"
    return f"/{regex_to_lark(body, 'dw')}/"


def _kinds(schema: dict) -> list:
    kind = schema.get("type")
    return kind if isinstance(kind, list) else [kind]


def _string_value(name: str, schema: dict, lines: list[str]) -> str:
    """The rule of a string parameter's raw text (appending its definitions to `lines`)."""
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if choices is not None:
        texts = [c for c in choices if isinstance(c, str)]
        if "null" in _kinds(schema) and None in choices:
            texts.append("null")
        if not texts or any(any(tag in t for tag in TAGS) or t != t.strip("\n") for t in texts):
            raise GrammarError(f"parameter {name!r}: its enum has no string a tool call can carry as raw text")
        return " | ".join(_literal(t) for t in texts)
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if not isinstance(low, int) or not (high is None or isinstance(high, int)):
        raise GrammarError(f"parameter {name!r}: minLength and maxLength must be integers")
    terminal = f"VALUE_{len(lines)}"
    parts = [f"/(?s:.{{{low},{'' if high is None else high}}})/", r"/([^\n]((?s:.*)[^\n])?)?/",
             *(f"~/(?s:.*){tag}(?s:.*)/" for tag in _TAG_REGEXES)]
    if "pattern" in schema:
        parts.append(_pattern(schema["pattern"]))
    lines.append(f"{terminal}: " + " & ".join(parts))
    return terminal


def _invoke(function: dict, lines: list[str]) -> str:
    """The rule of one invoke of `function` (appending its definitions to `lines`)."""
    name = function["name"]
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    required = parameters.get("required") or []
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise GrammarError(f"tool {name!r}: parameters.properties must be an object and required a list")
    if '"' in name or any('"' in key or "<" in key for key in list(properties) + required):
        raise GrammarError(f"tool {name!r}: a forced call cannot carry a name with '\"' or '<'")
    keys = list(properties) + [key for key in required if key not in properties]
    body = []
    for key in keys:
        schema = properties.get(key, {})
        if not isinstance(schema, dict):
            raise GrammarError(f"tool {name!r}: the schema of parameter {key!r} must be an object")
        value = _string_value(key, schema, lines) if "string" in _kinds(schema) else _json(schema)
        rule = f"param_{len(lines)}"
        lines.append(f'{rule}: {_literal(f"<parameter name={json.dumps(key)}>")} ({value}) {_literal(PARAM_CLOSE)}')
        body.append(rule if key in required else f"{rule}?")
    rule = f"invoke_{len(lines)}"
    opening = _literal(f"<invoke name={json.dumps(name)}>" + "\n")
    lines.append(f'{rule}: {opening} {" ".join(body)} {_literal(INVOKE_CLOSE)}')
    return rule


def tool_calls(tools: list[dict], only: str | None = None, parallel: bool = True) -> str:
    """One block of tool calls: of `only` (exactly one call), or of any of the tools (one or more, or just
    one when not `parallel`)."""
    functions = [tool.get("function", tool) for tool in tools]
    if only is not None:
        functions = [f for f in functions if f["name"] == only]
    lines: list[str] = []
    invokes = [_invoke(function, lines) for function in functions]
    repeat = "" if only is not None or not parallel else "+"
    lines.append(f"invoke: {' | '.join(invokes)}")
    return (f"start: {LEAD} {_literal(CALL_OPEN)} (invoke){repeat} {_literal(CALL_CLOSE)}\n" + "\n".join(lines)
            + "\n")


def json_or_calls(schema: dict | None, tools: list[dict], parallel: bool = True) -> str:
    """A JSON value of `schema` (None: any object), or a block of tool calls."""
    calls = tool_calls(tools, parallel=parallel).replace("start:", "calls:", 1).replace(f"calls: {LEAD} ", "calls: ")
    answer = _json({"type": "object"} if schema is None else schema)
    return f"start: {LEAD} (answer | calls)\nanswer: {answer}\n{calls}"
