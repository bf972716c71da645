"""Structured output requested by an OpenAI body: `response_format` (json_object, json_schema) and
`tool_choice` ("none", "auto", "required", a named function), turned into one grammar of the answer and
compiled by the grammar engine before the request is queued; every problem a RequestError naming its
parameter.

| tool_choice \\ response_format | text | json_object / json_schema |
| --- | --- | --- |
| "auto" (or absent) | free | the JSON, or tool calls when tools are given |
| "none" | no tool-call block | the JSON |
| "required" | one or more tool calls | one or more tool calls |
| a named function | exactly that call | exactly that call |
"""

from dataclasses import dataclass
from typing import Any

from minimax_m2.serving import grammars
from minimax_m2.serving.grammars import GrammarError
from minimax_m2.serving.request_error import RequestError
from minimax_m2.serving.served import ServedModel


@dataclass
class Structure:
    """A request's constraint: its grammar compiled (every choice copies it), and what the answer is."""

    matcher: Any  # llguidance.LLMatcher
    json: bool  # the answer is a JSON value (not parsed for tool calls)


def _response_schema(body: dict) -> tuple[bool, dict | None]:
    """(whether a JSON answer is asked for, its schema: None for any object)."""
    fmt = body.get("response_format")
    if fmt is None:
        return False, None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind != "json_schema":
        raise RequestError("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           "response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str) \
            or not isinstance(spec.get("schema", {}), dict) or not isinstance(spec.get("strict", False), bool):
        raise RequestError("'response_format.json_schema' must be {\"name\": a string, \"schema\": a JSON schema "
                           "object, \"strict\": true or false}", "response_format")
    return True, spec.get("schema")


def _tool_choice(body: dict, tools: list[dict] | None) -> str | None:
    """"auto", "none", "required", or the name of the function every reply calls."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise RequestError("'tool_choice' \"required\" needs 'tools'", "tool_choice")
        return choice or "auto"
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise RequestError("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                           "\"function\": {\"name\": ...}}", "tool_choice")
    if name not in [tool["function"]["name"] for tool in tools or []]:
        raise RequestError(f"'tool_choice' names function {name!r}, which is not among 'tools'", "tool_choice")
    return name


def structure(served: ServedModel, body: dict, tools: list[dict] | None) -> Structure | None:
    """The constraint a body asks for (None: the answer is free), compiled; a RequestError naming the parameter
    when it cannot be."""
    wants_json, schema = _response_schema(body)
    choice = _tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls", True) is not False
    param = "tools" if choice not in ("auto", "none") else "response_format"
    try:
        if choice not in ("auto", "none"):
            grammar, json_answer = grammars.tool_calls(tools, None if choice == "required" else choice, parallel), False
        elif wants_json:
            json_answer = choice == "none" or not tools
            grammar = grammars.json_answer(schema) if json_answer else grammars.json_or_calls(schema, tools, parallel)
        elif choice == "none" and body.get("tool_choice") == "none":
            grammar, json_answer = grammars.text_without_calls(), False
        else:
            return None
        if served.grammars is None:
            raise RequestError(f"structured output is not available on this server: {served.no_grammars}", param)
        return Structure(served.grammars.compile(grammar), json_answer)
    except GrammarError as err:
        raise RequestError(f"'{param}' cannot be followed: {err}", param) from None
