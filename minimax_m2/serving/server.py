"""An OpenAI-compatible server over the engine: /v1/models, /v1/chat/completions, /v1/completions, /metrics,
/health (FastAPI + uvicorn).

Requests run concurrently: each is tokenized off the event loop, checked, and handed to the engine (each of
its `n` choices as a request of its own), which batches it with the others; its tokens come back as events
and become text (detokenized incrementally, split into `reasoning_content`, `content` and `tool_calls` for
chat, cut at stop strings), streamed as server-sent events when `stream` is set.

No client can hang it:
- a client that disconnects, streaming or not, cancels its request: its slot is free at the next step;
- request bodies are bounded (`Limits.max_body_bytes`, 413 beyond) and must arrive within a time limit,
  and so must request headers (a connection that trickles them is closed);
- a prompt that cannot fit the context is refused before it is tokenized when its length alone shows it,
  and before it is queued otherwise;
- SIGTERM ends every request in flight (streams end with finish_reason "abort") and exits within seconds.
Every malformed request gets a 400 with an OpenAI error body naming the parameter, unsupported parameters
included; 404, 405 and 413 use the same body.
"""

import asyncio
import json
import logging
import math
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from minimax_m2.device.program import TOP_LOGPROBS
from minimax_m2.generation import Sampling
from minimax_m2.sampling import TokenLogprobs
from minimax_m2.serving.chat import GENERATION_PROMPT, ROLES, format_chat
from minimax_m2.serving.detokenize import IncrementalDetokenizer
from minimax_m2.serving.parsers import OutputParser, ParsedOutput

log = logging.getLogger("uvicorn.error")  # uvicorn's own handler prints it


class RequestError(ValueError):
    """A request the server refuses: an HTTP status (400 unless said) with an OpenAI body naming the parameter."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class EngineLike(Protocol):
    """What the server needs of an engine (`minimax_m2.serving.engine.Engine`, or its multi-rank front)."""

    def check(self, prompt_len: int, max_new_tokens: int) -> None: ...

    def submit(self, prompt: list[int], sampling: Sampling, notify: Any = None, keep_logits: bool = False) -> Any: ...

    def cancel(self, request: Any) -> None: ...

    def load(self) -> dict[str, float]: ...

    def counters(self) -> dict[str, float]: ...

    def stop(self, timeout: float = 10.0) -> None: ...


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    body_seconds: float = 30.0  # the whole body must arrive within this
    header_seconds: float = 10.0  # a request's headers must arrive within this
    max_connections: int = 1024
    log_seconds: float = 10.0  # how often a busy server logs its engine's load


@dataclass
class ServedModel:
    """What the server serves: a name, the engine, the tokenizer, generation defaults, the context length."""

    name: str
    engine: EngineLike
    tokenizer: Any
    defaults: Sampling
    max_seq_len: int
    chat_source: Path | None = None  # checkpoint (or prepared) directory whose chat template to use

    def __post_init__(self) -> None:
        vocab = self.tokenizer.get_vocab()
        # the most characters one token can stand for: a text longer than the context times this cannot fit
        self.max_token_chars = max(4, max((len(t) for t in vocab), default=1))


# --- request validation -------------------------------------------------------------------------------------

SUPPORTED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "seed", "stop", "stream", "stream_options", "tools", "tool_choice", "n", "logprobs", "top_logprobs"}
IGNORED = {"user", "metadata", "store", "parallel_tool_calls", "service_tier"}  # accepted, without effect here
UNSUPPORTED = {"response_format": "response_format",
               "presence_penalty": "presence and frequency penalties", "frequency_penalty":
               "presence and frequency penalties", "logit_bias": "logit_bias", "echo": "echo", "best_of": "best_of",
               "suffix": "suffix", "functions": "functions (use tools)", "function_call": "function_call (use tools)"}
MAX_CHOICES = 16  # 'n' at most: each choice is a request of its own in the engine
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs at most (as OpenAI's)
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "response_format": {"type": "text"}, "echo": False,
           "best_of": 1}


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
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise RequestError("'tool_choice' must be \"auto\" or \"none\" (forcing a tool is not supported)",
                           "tool_choice")


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
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": "
                           "...}}}}", "messages")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise RequestError(f"{where}.function.arguments is not JSON: {err}", "messages") from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object", "messages")
    return dict(call, function=dict(function, arguments=arguments))


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
    tools = _check_tools(body.get("tools")) if body.get("tool_choice") != "none" else None
    n = _number(body, "n", 1, MAX_CHOICES, integer=True) or 1
    logprobs = _logprobs(body, chat)
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True) or \
        _number(body, "max_tokens", 1, 1 << 30, integer=True) or served.defaults.max_new_tokens
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
    if len(text) > served.max_seq_len * served.max_token_chars:
        raise RequestError(f"the prompt's {len(text)} characters cannot fit the context of {served.max_seq_len} tokens",
                           "messages" if chat else "prompt")
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
    return Parsed(prompt, sampling, stop, chat, tools, chat and text.endswith(GENERATION_PROMPT),
                  body.get("stream", False), options.get("include_usage", False), n)


# --- from tokens to text ------------------------------------------------------------------------------------

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
    """A request's tokens as deltas: detokenized, split into reasoning / content / tool calls (chat), cut
    at the first stop string (`stopped` then turns true)."""

    def __init__(self, served: ServedModel, parsed: Parsed):
        self.detokenizer = IncrementalDetokenizer(served.tokenizer)
        self.parser = OutputParser(parsed.tools, parsed.reasoning_open) if parsed.chat else None
        self.stop, self.eos = parsed.stop, set(parsed.sampling.eos_token_ids)
        self.held, self.calls, self.stopped = "", 0, False

    def token(self, token: int) -> Delta | None:
        if token in self.eos:
            return None
        piece = self.detokenizer.feed(token)
        parts = self.parser.feed(piece) if self.parser else ParsedOutput(content=piece)
        self.held += parts.content
        cut = min((self.held.find(s) for s in self.stop if s in self.held), default=-1)
        if cut >= 0:
            self.held, self.stopped = self.held[:cut], True
        keep = 0 if cut >= 0 else max((len(s) - 1 for s in self.stop), default=0)
        split = max(0, len(self.held) - keep)
        out, self.held = self.held[:split], self.held[split:]
        self.calls += len(parts.tool_calls)
        if parts.reasoning or out or parts.tool_calls:
            return Delta(parts.reasoning, out, parts.tool_calls or None)
        return None

    def finish(self, reason: str) -> list[Delta]:
        """The rest of the text, then the finish reason (tool_calls when calls were made)."""
        rest = self.parser.finish() if self.parser and not self.stopped else ParsedOutput()
        self.calls += len(rest.tool_calls)
        deltas = []
        if rest.reasoning or rest.content or self.held or rest.tool_calls:
            deltas.append(Delta(rest.reasoning, self.held + rest.content, rest.tool_calls or None))
        deltas.append(Delta(finish_reason="tool_calls" if self.calls else "stop" if self.stopped else reason))
        return deltas


class EngineFailed(Exception):
    """The engine ended a request with an error (a rank was lost, say): the client gets a 503."""


async def run_request(served: ServedModel, parsed: Parsed, disconnected: asyncio.Event, choice: int = 0,
                      prefilled: asyncio.Event | None = None) -> AsyncIterator[Delta]:
    """One choice's deltas as the engine produces them; it is cancelled if the client disconnects or the
    consumer stops early, and ended at its first stop string. Choice i samples with the request's seed + i.
    Choice 0 sets `prefilled` at its first event (its prompt is then in the cache); every other choice waits
    for it before it is submitted, so that it reuses that prompt instead of prefilling it again."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def notify(kind: str, value: object) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    if choice and prefilled:
        await prefilled.wait()
        if disconnected.is_set():
            return
    sampling = parsed.sampling
    if choice and sampling.seed is not None:
        sampling = replace(sampling, seed=(sampling.seed + choice) % 2**64)
    request = served.engine.submit(parsed.prompt, sampling, notify)
    text = TextStream(served, parsed)
    scored: list[Scored] = []  # tokens whose log-probabilities no delta has carried yet
    logprob = None  # the next token's, when asked for
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            gone = asyncio.ensure_future(disconnected.wait())
            done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            gone.cancel()
            kind, value = getter.result()
            if prefilled and not choice:
                prefilled.set()
            if kind == "logprobs":
                logprob = value
            elif kind == "token":
                parsed.completion_tokens += 1
                if logprob is not None:
                    scored.append((value, logprob))
                    logprob = None
                delta = text.token(value)
                if delta:
                    delta.logprobs, scored = scored, []
                    yield delta
                if text.stopped:
                    served.engine.cancel(request)
                    for delta in with_scored(text.finish("stop"), scored):
                        yield delta
                    return
            elif kind == "error":
                raise EngineFailed(str(value))
            elif kind == "finish":
                for delta in with_scored(text.finish(value if value in ("stop", "length", "abort") else "length"),
                                         scored):
                    yield delta
                return
    finally:
        if prefilled and not choice:
            prefilled.set()
        if request.finish_reason is None:
            served.engine.cancel(request)


def with_scored(deltas: list[Delta], scored: list[Scored]) -> list[Delta]:
    """The last deltas of a choice, the first carrying the log-probabilities no delta has carried yet."""
    deltas[0].logprobs = scored + deltas[0].logprobs
    return deltas


def logprobs_field(served: ServedModel, parsed: Parsed, scored: list[Scored], offset: int = 0) -> dict | None:
    """A choice's (or chunk's) `logprobs` in the endpoint's format (None when not asked for): chat's
    {"content": [{token, logprob, bytes, top_logprobs}]}, or completions' {tokens, token_logprobs,
    top_logprobs, text_offset} with offsets from `offset` characters into the choice's text."""
    if parsed.sampling.logprobs is None:
        return None

    def text(token: int) -> str:
        return served.tokenizer.decode([token], skip_special_tokens=False)

    if parsed.chat:
        def entry(token: int, logprob: float) -> dict:
            return {"token": text(token), "logprob": logprob, "bytes": list(text(token).encode())}

        return {"content": [{**entry(token, logprob), "top_logprobs": [entry(i, v) for i, v in top]}
                            for token, (logprob, top) in scored]}
    tokens = [text(token) for token, _ in scored]
    starts = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [logprob for _, (logprob, _) in scored],
            "top_logprobs": [{text(i): v for i, v in top} for _, (_, top) in scored], "text_offset": starts}


async def run_choices(served: ServedModel, parsed: Parsed,
                      disconnected: asyncio.Event) -> AsyncIterator[tuple[int, Delta]]:
    """Every choice's deltas as (choice, delta), as they come (see `run_request`); leaving early, or an
    error in one choice, cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()
    prefilled = asyncio.Event()

    async def pump(choice: int) -> None:
        try:
            async for delta in run_request(served, parsed, disconnected, choice, prefilled):
                queue.put_nowait((choice, delta))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((choice, err))
        finally:
            queue.put_nowait((choice, None))

    tasks = [asyncio.ensure_future(pump(choice)) for choice in range(parsed.n)]
    try:
        running = parsed.n
        while running:
            choice, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()


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


# --- the application --------------------------------------------------------------------------------------

def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code: Any = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def build_app(served: ServedModel, limits: Limits = Limits()):
    """The FastAPI application serving `served`."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(_app):
        task = asyncio.ensure_future(report_load())
        yield
        task.cancel()

    async def report_load() -> None:
        """Queue depth, running rows and slot occupancy in the log, every `limits.log_seconds` while busy."""
        while True:
            await asyncio.sleep(limits.log_seconds)
            m = {**served.engine.load(), **served.engine.counters()}
            if m.get("running") or m.get("queue_depth"):
                log.info("engine: %d queued, %d running, %d of %d slots busy, %d tokens generated in %d steps",
                         m.get("queue_depth", 0), m.get("running", 0), m.get("slots_busy", 0), m.get("slots", 0),
                         m.get("generated_tokens", 0), m.get("steps", 0))

    app = FastAPI(title="MiniMax-M2 on nkipy kernels", lifespan=lifespan)

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(error_body(message, param, kind), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error"}
        return error(err.status_code, str(err.detail), kind=kinds.get(err.status_code, "invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal(_request, err: Exception) -> JSONResponse:
        log.exception("internal error")
        return error(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "minimax_m2"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lines = []
        engine = served.engine
        for kind, values, suffix in (("gauge", engine.load(), ""), ("counter", engine.counters(), "_total")):
            for key, value in values.items():
                lines += [f"# TYPE minimax_m2_{key}{suffix} {kind}", f"minimax_m2_{key}{suffix} {float(value):g}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def body_of(http: HttpRequest) -> Any:
        declared = http.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
            raise RequestError(f"the request body exceeds {limits.max_body_bytes} bytes", status=413)

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in http.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise RequestError(f"the request body exceeds {limits.max_body_bytes} bytes", status=413)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), limits.body_seconds)
        except asyncio.TimeoutError:
            raise RequestError(f"the request body did not arrive within {limits.body_seconds:g} s",
                               status=408) from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the request body is not valid JSON: {err}") from None

    def watch(http: HttpRequest) -> tuple[asyncio.Event, asyncio.Task]:
        """An event set when the client disconnects (the body has been read: the next message is that)."""
        disconnected = asyncio.Event()

        async def listen() -> None:
            while True:
                message = await http.receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        return disconnected, asyncio.ensure_future(listen())

    async def respond(http: HttpRequest, chat: bool):
        body = await body_of(http)
        parsed = await run_in_threadpool(parse_request, served, body, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            return {"prompt_tokens": len(parsed.prompt), "completion_tokens": parsed.completion_tokens,
                    "total_tokens": len(parsed.prompt) + parsed.completion_tokens}

        if not parsed.stream:
            disconnected, listener = watch(http)
            whole = [Delta(tool_calls=[], finish_reason="length") for _ in range(parsed.n)]
            try:
                async for i, delta in run_choices(served, parsed, disconnected):
                    whole[i].reasoning += delta.reasoning
                    whole[i].content += delta.content
                    whole[i].tool_calls += delta.tool_calls or []
                    whole[i].finish_reason = delta.finish_reason or whole[i].finish_reason
                    whole[i].logprobs += delta.logprobs
            except EngineFailed as err:
                return error(503, f"the model stopped: {err}", kind="server_error")
            finally:
                listener.cancel()
            return JSONResponse({"id": ident, "object": kind, "created": created, "model": served.name,
                                 "choices": [whole_choice(i, w, chat, logprobs_field(served, parsed, w.logprobs))
                                             for i, w in enumerate(whole)], "usage": usage()})

        async def events() -> AsyncIterator[str]:
            def sse(choices: list[dict], **extra: Any) -> str:
                data = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                        "model": served.name, "choices": choices, **extra}
                return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

            def chunk(i: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
                if chat:
                    return sse([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
                return sse([{"index": i, "text": delta.get("content", ""), "logprobs": logprobs,
                             "finish_reason": finish}])

            for i in range(parsed.n) if chat else ():
                yield chunk(i, {"role": "assistant", "content": ""})
            calls = [0] * parsed.n  # tool calls streamed so far, per choice
            offsets = [0] * parsed.n  # characters of each choice's tokens so far (completions' text_offset)
            try:
                async for i, delta in run_choices(served, parsed, asyncio.Event()):
                    logprobs = logprobs_field(served, parsed, delta.logprobs, offsets[i])
                    offsets[i] += sum(map(len, logprobs["tokens"])) if logprobs and not chat else 0
                    parts = [({"reasoning_content": delta.reasoning}, None)] if delta.reasoning else []
                    parts += [({"content": delta.content}, None)] if delta.content else []
                    for call in delta.tool_calls or []:
                        parts.append(({"tool_calls": [{"index": calls[i], "id": f"call_{uuid.uuid4().hex[:12]}",
                                                       **call}]}, None))
                        calls[i] += 1
                    parts += [({}, delta.finish_reason)] if delta.finish_reason else []
                    for j, (part, finish) in enumerate(parts):
                        yield chunk(i, part, finish, None if j else logprobs)
            except EngineFailed as err:
                yield f"data: {json.dumps(error_body(f'the model stopped: {err}', kind='server_error'))}\n\n"
            if parsed.include_usage:
                yield sse([], usage=usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def handle(http: HttpRequest, chat: bool):
        try:
            return await respond(http, chat)
        except RequestError as err:
            return error(err.status, str(err), err.param, "not_found_error" if err.status == 404 else
                         "invalid_request_error")
        except ValueError as err:  # from rendering the chat (a template's own error, say)
            return error(400, str(err), "messages" if chat else "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await handle(http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await handle(http, chat=False)

    return app


def protocol_with_header_deadline(seconds: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are not complete within
    `seconds` of its opening or of its previous response (a client trickling header bytes holds nothing)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

    return DeadlineProtocol


def make_server(served: ServedModel, host: str, port: int, limits: Limits = Limits(), log_level: str = "info"):
    """A uvicorn server for `served` whose SIGTERM / SIGINT first ends every request in flight (the engine
    stops: streams end with finish_reason "abort"), so that the graceful shutdown takes seconds, after
    which the process exits normally (status 0, where uvicorn would re-raise the signal)."""
    import uvicorn

    config = uvicorn.Config(build_app(served, limits), host=host, port=port, log_level=log_level,
                            http=protocol_with_header_deadline(limits.header_seconds), timeout_graceful_shutdown=5,
                            limit_concurrency=limits.max_connections, timeout_keep_alive=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            served.engine.stop(timeout=0)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    return Server(config)


def serve(served: ServedModel, host: str, port: int, limits: Limits = Limits()) -> None:
    """Run the server until SIGTERM or SIGINT."""
    try:
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ImportError("--mode serve needs fastapi and uvicorn: pip install -e '.[serve]'") from err
    make_server(served, host, port, limits).run()
