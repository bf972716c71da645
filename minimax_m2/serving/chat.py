"""MiniMax-M2's chat format: the conversation as the model saw it in training.

The checkpoint's own `chat_template` (jinja2, from tokenizer_config.json or chat_template.jinja) is used
when the checkpoint has one; otherwise `render_chat` writes the format as documented for MiniMax-M2
(../shared/fixtures/minimax_m2_hub/CHECKPOINT_FACTS.md):

    ]~!b[]~b]system\\n<system text><tools section>[e~[\\n
    ]~b]user\\n<text>[e~[\\n
    ]~b]ai\\n<think>\\n<reasoning>\\n</think>\\n\\n<text><tool calls>[e~[\\n
    ]~b]tool\\n<response>result</response>[e~[\\n
    ]~b]ai\\n<think>\\n                      <- the generation prompt: reasoning already opened
"""

import json
from pathlib import Path
from typing import Any

from minimax_m2 import bounded_json
from minimax_m2.weights.files import read_json

BEGIN = "]~!b["
END = "[e~["
ROLES = {"system": "]~b]system", "user": "]~b]user", "assistant": "]~b]ai", "tool": "]~b]tool"}
GENERATION_PROMPT = "]~b]ai\n<think>\n"
DEFAULT_SYSTEM = "You are a helpful assistant. Your name is MiniMax-M2 and is built by MiniMax."
TOOLS_HEADER = ("\n\n# Tools\nYou may call one or more tools to assist with the user query.\n"
                "Here are the tools available in JSONSchema format:\n\n<tools>\n")
TOOLS_FOOTER = ("</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n"
                "<minimax:tool_call>\n<invoke name=\"tool-name-1\">\n"
                "<parameter name=\"param-key-1\">param-value-1</parameter>\n"
                "<parameter name=\"param-key-2\">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>")

Message = dict[str, Any]


def _function(tool: dict) -> dict:
    """An OpenAI tool ({"type": "function", "function": {...}}) or a bare function -> the function."""
    return tool.get("function", tool)


def _tools_section(tools: list[dict]) -> str:
    listed = "".join(f"<tool>{json.dumps(_function(t), ensure_ascii=False)}</tool>\n" for t in tools)
    return TOOLS_HEADER + listed + TOOLS_FOOTER


def _text(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content
                   if isinstance(p, str) or isinstance(p, dict) and p.get("type") == "text")


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render_tool_calls(calls: list[dict]) -> str:
    """OpenAI tool_calls -> one <minimax:tool_call> block (arguments as a JSON string or a dict)."""
    if not calls:
        return ""
    invokes = []
    for call in calls:
        function = _function(call)
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            arguments = bounded_json.loads(arguments) if arguments.strip() else {}
        params = "".join(f'<parameter name="{k}">{_value(v)}</parameter>\n' for k, v in arguments.items())
        invokes.append(f'<invoke name="{function["name"]}">\n{params}</invoke>\n')
    return "<minimax:tool_call>\n" + "".join(invokes) + "</minimax:tool_call>"


def render_chat(messages: list[Message], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
    """The project's implementation of the format. Reasoning of assistant turns (`reasoning_content`, or a
    <think> block inside the content) is kept only after the last user message; consecutive tool
    results share one tool turn, each in <response>...</response>."""
    if messages and messages[0]["role"] == "system":
        system, rest = _text(messages[0].get("content")) or DEFAULT_SYSTEM, messages[1:]
    else:
        system, rest = DEFAULT_SYSTEM, messages
    text = f"{BEGIN}{ROLES['system']}\n{system}{_tools_section(tools) if tools else ''}{END}\n"
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    for i, message in enumerate(rest):
        role = message["role"]
        if role not in ROLES or role == "system":
            raise ValueError(f"message {i + 1}: role {role!r} is not one of user, assistant, tool (system only first)")
        body = _text(message.get("content"))
        if role == "tool":
            first = i == 0 or rest[i - 1]["role"] != "tool"
            last = i == len(rest) - 1 or rest[i + 1]["role"] != "tool"
            text += (ROLES["tool"] if first else "") + f"\n<response>{body}</response>" + (f"{END}\n" if last else "")
            continue
        if role == "assistant":
            reasoning = message.get("reasoning_content")
            if not isinstance(reasoning, str) and "</think>" in body:
                reasoning = body.split("</think>")[0].strip("\n").split("<think>")[-1].strip("\n")
                body = body.split("</think>")[-1].strip("\n")
            thought = f"<think>\n{reasoning}\n</think>\n\n" if reasoning and i > last_user else ""
            body = thought + body + render_tool_calls(message.get("tool_calls") or [])
        text += f"{ROLES[role]}\n{body}{END}\n"
    return text + (GENERATION_PROMPT if add_generation_prompt else "")


def checkpoint_template(path: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, or tokenizer_config.json's chat_template."""
    file = path / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    config = path / "tokenizer_config.json"
    if config.is_file():
        raw = read_json(config, "")
        template = raw.get("chat_template") if isinstance(raw, dict) else None
        if isinstance(template, str):
            return template
    return None


def render_with_template(template: str, messages: list[Message], tools: list[dict] | None = None,
                         add_generation_prompt: bool = True) -> str:
    """Render a jinja2 chat template as transformers does (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None, ensure_ascii=False: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, tools=tools,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        line = f" line {err.lineno}" if getattr(err, "lineno", None) else ""
        raise ValueError(f"the checkpoint's chat template{line}: {err.message or type(err).__name__}") from None


def format_chat(path: Path | None, messages: list[Message], tools: list[dict] | None = None) -> str:
    """The prompt text for a conversation: the checkpoint's template when it has one, else render_chat."""
    template = checkpoint_template(path) if path else None
    if template is None:
        return render_chat(messages, tools)
    return render_with_template(template, messages, tools)
