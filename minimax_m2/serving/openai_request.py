"""OpenAI request bodies (chat and text completions), validated and turned into a prompt and sampling
settings before anything is queued: every problem is a `RequestError` naming its parameter.

A body is decoded within bounds (`bounded_json`: nesting depth, valid Unicode); each parameter is checked
by type and range in one place, both spellings of a parameter included; a prompt's length is checked
against the context from its characters before it is tokenized, and from its tokens before it is queued."""

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from minimax_m2 import bounded_json
from minimax_m2.device.program import TOP_LOGPROBS
from minimax_m2.generation import Sampling
from minimax_m2.serving.chat import GENERATION_PROMPT, ROLES, format_chat
from minimax_m2.serving.request_error import RequestError
from minimax_m2.serving.served import ServedModel
from minimax_m2.serving.structured import Structure, structure

SUPPORTED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "seed", "stop", "stream", "stream_options", "tools", "tool_choice", "n", "logprobs", "top_logprobs",
             "response_format", "parallel_tool_calls"}
# accepted, without effect here, when of their type
IGNORED = {"user": (str, "a string"), "metadata": (dict, "an object"), "store": (bool, "true or false"),
           "service_tier": (str, "a string")}
UNSUPPORTED = {"presence_penalty": "presence and frequency penalties", "frequency_penalty":
               "presence and frequency penalties", "logit_bias": "logit_bias", "echo": "echo", "best_of": "best_of",
               "suffix": "suffix", "functions": "functions (use tools)", "function_call": "function_call (use tools)"}
_SPACES = re.compile(r"\s+")
MAX_CHOICES = 16  # 'n' at most: each choice is a request of its own in the engine
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs at most (as OpenAI's)
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "echo": False, "best_of": 1}


def _number(body: dict, key: str, low: float, high: float, integer: bool = False, low_open: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)) \
        or not math.isfinite(value) or not low <= value <= high or (low_open and value == low)
    if bad:
        bound = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'} in {bound}, got {value!r}", key)
    return value


def _check_parameters(body: dict) -> None:
    for key, value in body.items():
        if key in IGNORED and value is not None and not isinstance(value, IGNORED[key][0]):
            raise RequestError(f"'{key}' must be {IGNORED[key][1]}, got {value!r:.40}", key)
        if key in SUPPORTED or key in IGNORED:
            continue
        if key in UNSUPPORTED:
            if key in NEUTRAL and value == NEUTRAL[key] or value is None:
                continue
            raise RequestError(f"'{key}' is not supported by this server ({UNSUPPORTED[key]})", key)
        raise RequestError(f"unknown parameter '{key}'", key)
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(f"'stream' must be true or false, got {body.get('stream')!r}", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)
                                or set(options) - {"include_usage"}):
        raise RequestError("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    if not isinstance(body.get("parallel_tool_calls", True), bool):
        raise RequestError(f"'parallel_tool_calls' must be true or false, got {body['parallel_tool_calls']!r}",
                           "parallel_tool_calls")


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives each new token's log-probability comes with (None: no log-probabilities):
    chat's logprobs (true / false) and top_logprobs, or completions' logprobs (a count)."""
    if not chat:
        return _number(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, integer=True)
    wanted, top = body.get("logprobs"), _number(body, "top_logprobs", 0, TOP_LOGPROBS, integer=True)
    if wanted not in (None, True, False):
        raise RequestError(f"'logprobs' must be true or false, got {wanted!r}", "logprobs")
    if top is not None and not wanted:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _check_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects", "tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"] \
                or not isinstance(function.get("parameters", {}), dict) \
                or not isinstance(function.get("description", ""), str):
            raise RequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": a string, "
                               "\"description\": a string, \"parameters\": a JSON schema object}}}}", "tools")
    return tools


def _check_content(content: Any, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return
    raise RequestError(f"{where}.content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts "
                       "(images and other parts are not supported)", "messages")


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}", "messages")
        if message["role"] == "system" and i:
            raise RequestError(f"{where}: a system message may only come first", "messages")
        _check_content(message.get("content"), where)
        if not isinstance(message.get("reasoning_content", ""), (str, type(None))):
            raise RequestError(f"{where}.reasoning_content must be a string", "messages")
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant" or not isinstance(calls, list):
                raise RequestError(f"{where}.tool_calls must be a list, on an assistant message", "messages")
            message = dict(message, tool_calls=[_check_call(call, f"{where}.tool_calls[{j}]")
                                                for j, call in enumerate(calls)])
        checked.append(message)
    return checked


def _check_call(call: Any, where: str) -> dict:
    """An assistant message's tool call, as OpenAI's API defines it (`arguments` a string holding a JSON
    object; empty means no arguments), with its arguments decoded for the chat template."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": "
                           "...}}}}", "messages")
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        raise RequestError(f"{where}.function.arguments must be a string holding a JSON object, got "
                           f"{type(arguments).__name__} {arguments!r:.40}", "messages")
    try:
        arguments = bounded_json.loads(arguments) if arguments.strip() else {}
    except bounded_json.JSONInputError as err:
        raise RequestError(f"{where}.function.arguments: {err}", "messages") from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments must hold a JSON object, got {arguments!r:.40}", "messages")
    return dict(call, function=dict(function, arguments=arguments))


def decode_body(raw: bytes) -> Any:
    """A request body as JSON within `bounded_json`'s bounds; a RequestError naming the parameter where a
    string is not valid Unicode."""
    try:
        return bounded_json.loads(raw)
    except bounded_json.JSONInputError as err:
        param = err.path.split(".")[0].split("[")[0] or None
        raise RequestError(f"the request body is refused: {err}", param) from None


@dataclass
class Parsed:
    prompt: list[int]
    sampling: Sampling
    stop: list[str]
    chat: bool
    tools: list[dict] | None
    reasoning_open: bool
    stream: bool
    include_usage: bool
    n: int = 1  # choices
    completion_tokens: int = 0  # of every choice, counted as the engine produces them
    structure: Structure | None = None  # the grammar its answer is held to


def parse_request(served: ServedModel, body: Any, chat: bool) -> Parsed:
    """Validate an OpenAI request body, render and tokenize its prompt; every problem is a RequestError
    naming its parameter. The prompt's length is checked against the context from its characters before
    it is tokenized, and from its tokens before it is queued."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_parameters(body)
    if body.get("model") not in (None, served.name):
        raise RequestError(f"model {body.get('model')!r} does not exist; this server serves {served.name!r}", "model",
                           status=404)
    tools = _check_tools(body.get("tools"))
    held = structure(served, body, tools)
    tools = tools if body.get("tool_choice") != "none" else None
    n = _number(body, "n", 1, MAX_CHOICES, integer=True) or 1
    logprobs = _logprobs(body, chat)
    max_tokens = [_number(body, key, 1, 1 << 30, integer=True) for key in ("max_completion_tokens", "max_tokens")]
    max_tokens = next((m for m in max_tokens if m is not None), served.defaults.max_new_tokens)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, low_open=True)
    top_k = _number(body, "top_k", -1, 1 << 30, integer=True)
    seed = _number(body, "seed", -(2**63), 2**64 - 1, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of at most 16 non-empty strings", "stop")
    if chat:
        text = format_chat(served.chat_source, _check_messages(body.get("messages")), tools)
    else:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise RequestError("'prompt' must be a non-empty string (token arrays and several prompts are not "
                               "supported)", "prompt")
    visible = len(text) - sum(len(run) for run in _SPACES.findall(text))  # a pre-tokenizer may drop whitespace
    if visible > served.max_seq_len * served.max_token_chars:
        raise RequestError(f"the prompt's {visible} characters besides whitespace cannot fit the context of "
                           f"{served.max_seq_len} tokens", "messages" if chat else "prompt")
    prompt = served.tokenizer.encode(text, add_special_tokens=False).ids
    try:
        served.engine.check(len(prompt), max_tokens)
    except ValueError as err:
        raise RequestError(str(err), "max_tokens" if prompt else ("messages" if chat else "prompt")) from None
    d = served.defaults
    sampling = replace(d, max_new_tokens=max_tokens, seed=None if seed is None else seed % 2**64, logprobs=logprobs,
                       temperature=d.temperature if temperature is None else temperature,
                       top_p=d.top_p if top_p is None else top_p,
                       top_k=d.top_k if top_k is None else (None if top_k in (-1, 0) else top_k))
    if sampling.temperature == 0:
        sampling = replace(sampling, top_k=None, top_p=None)
    options = body.get("stream_options") or {}
    return Parsed(prompt, sampling, [] if held else stop, chat, tools, chat and text.endswith(GENERATION_PROMPT),
                  body.get("stream", False), options.get("include_usage", False), n, structure=held)
