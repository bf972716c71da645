"""MiniMax-M2's chat format, and the reasoning / tool-call parsers, streamed and whole."""

import json

import numpy as np
import pytest

from minimax_m2.serving.chat import DEFAULT_SYSTEM, GENERATION_PROMPT, format_chat, render_chat, render_with_template
from minimax_m2.serving.parsers import OutputParser, ParsedOutput, parse_output

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "celsius": {"type": "boolean"},
        "threshold": {"type": "number"}, "hours": {"type": "array"}, "extra": {"type": "object"},
        "note": {"type": ["string", "null"]}}}}}

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Call the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Paris", "days": 2}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"rain": false}'},
    {"role": "assistant", "content": "21 degrees.", "reasoning_content": "Report it."},
    {"role": "user", "content": "Thanks"},
]

# The format of chat.py written as a jinja2 template: checks that the checkpoint-template path renders
# conversations the way the built-in path does (system, user, assistant with reasoning and tool calls, tool).
TEMPLATE = """{%- set sys = messages[0].content if messages and messages[0].role == 'system' else DEFAULT -%}
{%- set rest = messages[1:] if messages and messages[0].role == 'system' else messages -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in rest %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
]~!b[]~b]system
{{ sys }}
{%- if tools %}


# Tools
You may call one or more tools to assist with the user query.
Here are the tools available in JSONSchema format:

<tools>
{% for t in tools %}<tool>{{ (t.function if t.function is defined else t) | tojson }}</tool>
{% endfor %}</tools>

When making tool calls, use XML format to invoke tools and pass parameters:

<minimax:tool_call>
<invoke name="tool-name-1">
<parameter name="param-key-1">param-value-1</parameter>
<parameter name="param-key-2">param-value-2</parameter>
...
</invoke>
</minimax:tool_call>
{%- endif %}[e~[
{% for m in rest -%}
{%- if m.role == 'user' %}]~b]user
{{ m.content }}[e~[
{% elif m.role == 'tool' %}{% if loop.first or rest[loop.index0 - 1].role != 'tool' %}]~b]tool{% endif %}{{ "\n" }}<response>{{ m.content }}</response>{% if loop.last or rest[loop.index0 + 1].role != 'tool' %}[e~[
{% endif %}{% else %}]~b]ai
{% if m.reasoning_content and loop.index0 > ns.last_user %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}
{%- if m.tool_calls %}<minimax:tool_call>
{% for c in m.tool_calls %}<invoke name="{{ c.function.name }}">
{% for k, v in c.function.arguments.items() %}<parameter name="{{ k }}">{{ v if v is string else (v | tojson) }}</parameter>
{% endfor %}</invoke>
{% endfor %}</minimax:tool_call>{% endif %}[e~[
{% endif %}{% endfor -%}
{% if add_generation_prompt %}]~b]ai
<think>
{% endif %}"""


def _template() -> str:
    return TEMPLATE.replace("DEFAULT", json.dumps(DEFAULT_SYSTEM))


def test_format_of_a_conversation() -> None:
    text = render_chat(CONVERSATION, [WEATHER])
    assert text.startswith("]~!b[]~b]system\nBe brief.\n\n# Tools\n")
    assert '<tool>{"name": "get_weather"' in text
    assert "]~b]user\nWeather in Paris?[e~[\n" in text
    assert '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n' in text
    assert ']~b]tool\n<response>{"temp": 21}</response>\n<response>{"rain": false}</response>[e~[\n' in text
    assert "Call the tool." not in text and "Report it." not in text, "reasoning before the last user turn is dropped"
    assert text.endswith("]~b]user\nThanks[e~[\n" + GENERATION_PROMPT)
    assert render_chat([{"role": "user", "content": "hi"}]).startswith(f"]~!b[]~b]system\n{DEFAULT_SYSTEM}[e~[\n")


@pytest.mark.parametrize("conversation, tools", [
    ([{"role": "user", "content": "hi"}], None),
    (CONVERSATION, [WEATHER]),
    (CONVERSATION[:6], None),
], ids=["user", "tools", "reasoning-kept-after-last-user"])
def test_checkpoint_template_and_builtin_format_agree(conversation, tools, tmp_path) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: F401 - the template path needs jinja2

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": _template()}))
    rendered = format_chat(tmp_path, conversation, tools)
    assert rendered == render_chat(conversation, tools)
    assert format_chat(None, conversation, tools) == render_chat(conversation, tools)


def test_bad_role_is_named() -> None:
    with pytest.raises(ValueError, match="message 1: role 'robot'"):
        render_chat([{"role": "robot", "content": "x"}])


def test_template_errors_are_reported() -> None:
    with pytest.raises(ValueError, match="chat template: no"):
        render_with_template("{{ raise_exception('no') }}", [])


OUTPUTS = [
    ("M2 style: only the closing tag", "The user greets me.\n</think>\n\nHello! How can I help?", True),
    ("both tags", "<think>plan</think>\n\nAnswer.", False),
    ("no reasoning at all", "Just text with a < sign and </thin text", False),
    ("a tool call", "Need weather.\n</think>\n\nLet me check.<minimax:tool_call>\n<invoke name=\"get_weather\">\n"
     "<parameter name=\"city\">São Paulo</parameter>\n<parameter name=\"days\">3</parameter>\n"
     "<parameter name=\"celsius\">true</parameter>\n<parameter name=\"threshold\">2.5</parameter>\n"
     "<parameter name=\"hours\">[1, 2]</parameter>\n<parameter name=\"extra\">{\"a\": null}</parameter>\n"
     "<parameter name=\"note\">null</parameter>\n</invoke>\n</minimax:tool_call>", True),
    ("two calls in one block, text after", "x</think><minimax:tool_call><invoke name=\"a\"><parameter name=\"k\">1"
     "</parameter></invoke><invoke name=\"b\"></invoke></minimax:tool_call> done", True),
    ("unterminated block", "r</think>ok <minimax:tool_call>\n<invoke name=\"a\">\n</invoke>\n<invoke name=\"b\"", True),
]


def _streamed(text: str, reasoning_open: bool, seed: int) -> ParsedOutput:
    """Fed in random pieces of 1 to 4 characters, as tokens arrive."""
    rng = np.random.default_rng(seed)
    parser, total = OutputParser([WEATHER], reasoning_open), ParsedOutput()
    at = 0
    pieces = []
    while at < len(text):
        step = int(rng.integers(1, 5))
        pieces.append(text[at : at + step])
        at += step
    for part in [parser.feed(p) for p in pieces] + [parser.finish()]:
        total.reasoning += part.reasoning
        total.content += part.content
        total.tool_calls += part.tool_calls
    return total


@pytest.mark.parametrize("name, text, reasoning_open", OUTPUTS, ids=[o[0] for o in OUTPUTS])
def test_streamed_parse_equals_whole_parse(name, text, reasoning_open) -> None:
    whole = parse_output(text, [WEATHER], reasoning_open)
    for seed in range(5):
        assert _streamed(text, reasoning_open, seed) == whole


def test_parsed_values() -> None:
    out = parse_output(OUTPUTS[0][1])
    assert (out.reasoning, out.content, out.tool_calls) == ("The user greets me.\n", "Hello! How can I help?", [])
    call = parse_output(OUTPUTS[3][1], [WEATHER])
    assert call.content == "Let me check."
    arguments = json.loads(call.tool_calls[0]["function"]["arguments"])
    assert arguments == {"city": "São Paulo", "days": 3, "celsius": True, "threshold": 2.5, "hours": [1, 2],
                         "extra": {"a": None}, "note": None}
    two = parse_output(OUTPUTS[4][1])
    assert [c["function"]["name"] for c in two.tool_calls] == ["a", "b"] and two.content == " done"
    assert [c["function"]["name"] for c in parse_output(OUTPUTS[5][1]).tool_calls] == ["a"]
    assert parse_output(OUTPUTS[2][1], reasoning_open=False).content == OUTPUTS[2][1]


def test_a_tool_call_value_nested_beyond_bounds_stays_text() -> None:
    """The model may emit any text as a parameter: a value nested deeper than JSON input may be is kept as
    the text it is, never a RecursionError."""
    deep = "[" * 5000 + "]" * 5000
    text = (f'<minimax:tool_call>\n<invoke name="f">\n<parameter name="x">{deep}</parameter>\n</invoke>\n'
            "</minimax:tool_call>")
    call = parse_output(text, [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array"}}}}}], reasoning_open=False).tool_calls[0]
    assert json.loads(call["function"]["arguments"]) == {"x": deep}
