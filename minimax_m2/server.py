"""An OpenAI-compatible server: /v1/models, /v1/chat/completions and /v1/completions (FastAPI + uvicorn).

Requests are queued: one generation runs at a time (the model holds one KV cache), in arrival order.
Chat requests are formatted as MiniMax-M2's chat; their output is split into `reasoning_content`,
`content` and `tool_calls`, streamed as server-sent events when `stream` is set. Bad requests get a
400 with an OpenAI-style error body and the server keeps serving.
"""

import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from minimax_m2.chat import GENERATION_PROMPT, format_chat
from minimax_m2.detokenize import IncrementalDetokenizer
from minimax_m2.generation import Sampling
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.parsers import OutputParser, ParsedOutput

TokenSource = Callable[[np.ndarray, Sampling], Iterator[int]]


class RequestError(ValueError):
    """A request the server refuses: 400 with an OpenAI-style body naming the parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Engine:
    """What the server runs: a tokenizer, a source of token ids for a prompt, and the context length."""

    name: str
    tokenizer: Any
    tokens: TokenSource
    max_seq_len: int
    defaults: Sampling
    chat_source: Path | None = None  # checkpoint directory whose chat template to use

    @classmethod
    def for_model(cls, name: str, model: MiniMaxM2Model, tokenizer: Any, defaults: Sampling,
                  chat_source: Path | None) -> "Engine":
        def tokens(prompt: np.ndarray, sampling: Sampling) -> Iterator[int]:
            for new, _ in model.generate_steps(prompt, sampling.max_new_tokens, sampling.temperature, sampling.top_k,
                                               sampling.top_p, sampling.seed, eos_token_ids=sampling.eos_token_ids):
                yield int(new[0, 0])

        return cls(name, tokenizer, tokens, model.max_seq_len, defaults, chat_source)


def _number(body: dict, key: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)) \
            or not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'} in [{low}, {high}], got {value!r}", key)
    return value


@dataclass
class Request:
    prompt: np.ndarray  # [1, n] token ids
    sampling: Sampling
    stop: list[str]
    chat: bool
    tools: list[dict] | None
    reasoning_open: bool
    completion_tokens: int = 0


def parse_request(engine: Engine, body: Any, chat: bool) -> Request:
    """Validate an OpenAI request body; every problem is a RequestError naming its parameter."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("model") not in (None, engine.name):
        raise RequestError(f"model {body.get('model')!r} does not exist; this server serves {engine.name!r}", "model")
    tools = body.get("tools")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
        for message in messages:
            for call in message.get("tool_calls") or []:
                arguments = call.get("function", {}).get("arguments")
                if isinstance(arguments, str):
                    try:
                        call["function"]["arguments"] = json.loads(arguments) if arguments.strip() else {}
                    except json.JSONDecodeError as err:
                        raise RequestError(f"tool call arguments are not JSON: {err}", "messages") from err
        text = format_chat(engine.chat_source, messages, tools)
    else:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise RequestError("'prompt' must be a non-empty string", "prompt")
    prompt = np.array([engine.tokenizer.encode(text, add_special_tokens=False).ids], dtype=np.int64)
    max_tokens = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True) or \
        _number(body, "max_tokens", 1, 1 << 30, integer=True) or engine.defaults.max_new_tokens
    if prompt.shape[1] + max_tokens - 1 > engine.max_seq_len:
        raise RequestError(f"the prompt's {prompt.shape[1]} tokens + max_tokens {max_tokens} exceed the context of "
                           f"{engine.max_seq_len} tokens", "max_tokens")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 1e-9, 1)
    top_k = _number(body, "top_k", 1, 1 << 30, integer=True)
    seed = _number(body, "seed", 0, 2**63, integer=True)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a string or a list of non-empty strings", "stop")
    d = engine.defaults
    sampling = replace(d, max_new_tokens=max_tokens, seed=seed,
                       temperature=d.temperature if temperature is None else temperature,
                       top_p=d.top_p if top_p is None else top_p, top_k=d.top_k if top_k is None else top_k)
    if sampling.temperature == 0:
        sampling = replace(sampling, top_k=None, top_p=None)
    return Request(prompt, sampling, stop, chat, tools, chat and text.endswith(GENERATION_PROMPT))


@dataclass
class Delta:
    """What one step of a generation adds."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] | None = None
    finish_reason: str | None = None


def generate(engine: Engine, request: Request, lock: threading.Lock) -> Iterator[Delta]:
    """Deltas of one request, run under `lock` (one generation at a time). Stop sequences end the
    content at their first occurrence; finish_reason is stop, length or tool_calls."""
    detokenizer = IncrementalDetokenizer(engine.tokenizer)
    parser = OutputParser(request.tools, request.reasoning_open) if request.chat else None
    eos = set(request.sampling.eos_token_ids)
    held, produced, calls, reason = "", 0, 0, "length"
    with lock:
        for token in engine.tokens(request.prompt, request.sampling):
            produced += 1
            if token in eos:
                reason = "stop"
                break
            piece = detokenizer.feed(token)
            parts = parser.feed(piece) if parser else ParsedOutput(content=piece)
            held += parts.content
            cut = min((held.find(s) for s in request.stop if s in held), default=-1)
            if cut >= 0:
                held, reason = held[:cut], "stop"
            split = len(held) if cut >= 0 else max(0, len(held) - max((len(s) - 1 for s in request.stop), default=0))
            out, held = held[:split], held[split:]
            calls += len(parts.tool_calls)
            if parts.reasoning or out or parts.tool_calls:
                yield Delta(parts.reasoning, out, parts.tool_calls or None)
            if cut >= 0:
                break
        rest = parser.finish() if parser and reason != "stop" else ParsedOutput()
        calls += len(rest.tool_calls)
        if rest.reasoning or rest.content or held or rest.tool_calls:
            yield Delta(rest.reasoning, held + rest.content, rest.tool_calls or None)
    yield Delta(finish_reason="tool_calls" if calls else reason)
    request.completion_tokens = produced


def build_app(engine: Engine):
    """The FastAPI application serving `engine`."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="MiniMax-M2 on nkipy kernels")
    lock = threading.Lock()

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)

    @app.exception_handler(Exception)
    async def internal(_request, err: Exception) -> JSONResponse:
        return error(500, f"{type(err).__name__}: {err}", kind="server_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "minimax_m2"}]}

    async def body_of(http: HttpRequest) -> Any:
        try:
            return json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the request body is not valid JSON: {err}") from err

    def respond(body: dict, chat: bool):
        request = parse_request(engine, body, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            prompt = int(request.prompt.shape[1])
            return {"prompt_tokens": prompt, "completion_tokens": request.completion_tokens,
                    "total_tokens": prompt + request.completion_tokens}

        if not body.get("stream"):
            reasoning, content, calls, reason = "", "", [], "length"
            for delta in generate(engine, request, lock):
                reasoning, content = reasoning + delta.reasoning, content + delta.content
                calls += delta.tool_calls or []
                reason = delta.finish_reason or reason
            if chat:
                message = {"role": "assistant", "content": content or (None if calls else ""),
                           "reasoning_content": reasoning or None}
                if calls:
                    message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:12]}", **c} for c in calls]
                choice = {"index": 0, "message": message, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": content, "finish_reason": reason}
            return JSONResponse({"id": ident, "object": kind, "created": created, "model": engine.name,
                                 "choices": [choice], "usage": usage()})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def events() -> Iterator[str]:
            def chunk(delta: dict, finish: str | None = None, with_usage: bool = False) -> str:
                if chat:
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta.get("content", ""), "finish_reason": finish}
                data = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                        "model": engine.name, "choices": [] if with_usage else [choice]}
                if with_usage:
                    data["usage"] = usage()
                return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

            if chat:
                yield chunk({"role": "assistant", "content": ""})
            index = 0
            for delta in generate(engine, request, lock):
                if delta.finish_reason:
                    yield chunk({}, delta.finish_reason)
                    continue
                if delta.reasoning:
                    yield chunk({"reasoning_content": delta.reasoning})
                if delta.content:
                    yield chunk({"content": delta.content})
                for call in delta.tool_calls or []:
                    yield chunk({"tool_calls": [{"index": index, "id": f"call_{uuid.uuid4().hex[:12]}", **call}]})
                    index += 1
            if include_usage:
                yield chunk({}, with_usage=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def handle(http: HttpRequest, chat: bool):
        try:
            return await run_in_threadpool(respond, await body_of(http), chat)
        except RequestError as err:
            return error(400, str(err), err.param)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await handle(http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await handle(http, chat=False)

    return app


def serve(engine: Engine, host: str, port: int) -> None:
    """Run the server until interrupted."""
    try:
        import uvicorn
    except ImportError as err:
        raise ImportError("--mode serve needs fastapi and uvicorn: pip install -e '.[serve]'") from err
    uvicorn.run(build_app(engine), host=host, port=port, log_level="info")
