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
import signal
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from minimax_m2.serving.openai_request import Parsed, RequestError, decode_body, parse_request
from minimax_m2.serving.responses import (
    Delta,
    Scored,
    TextOffsets,
    TextStream,
    logprobs_field,
    whole_choice,
    with_scored,
)
from minimax_m2.serving.served import EngineLike, ServedModel

log = logging.getLogger("uvicorn.error")  # uvicorn's own handler prints it

__all__ = ["EngineLike", "Limits", "ServedModel", "build_app", "make_server", "serve"]


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    body_seconds: float = 30.0  # the whole body must arrive within this
    header_seconds: float = 10.0  # a request's headers must arrive within this
    max_connections: int = 1024
    log_seconds: float = 10.0  # how often a busy server logs its engine's load


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
    held = parsed.structure
    constraint = held and served.grammars.constraint(held.matcher, parsed.reasoning_open)
    request = served.engine.submit(parsed.prompt, sampling, notify, constraint=constraint)
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
        counters = {**engine.counters(), **(served.grammars.stats if served.grammars else {})}
        for kind, values, suffix in (("gauge", engine.load(), ""), ("counter", counters, "_total")):
            for key, value in values.items():
                lines += [f"# TYPE minimax_m2_{key}{suffix} {kind}", f"minimax_m2_{key}{suffix} {float(value):g}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def body_of(http: HttpRequest) -> bytes:
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
        return raw

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
        raw = await body_of(http)
        parsed = await run_in_threadpool(lambda: parse_request(served, decode_body(raw), chat))
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
                                 "choices": [whole_choice(i, w, chat, logprobs_field(served, parsed, w.logprobs,
                                                                                     TextOffsets(len(w.content))))
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
            offsets = [TextOffsets() for _ in range(parsed.n)]  # each choice's completions' text_offset
            try:
                async for i, delta in run_choices(served, parsed, asyncio.Event()):
                    logprobs = logprobs_field(served, parsed, delta.logprobs, offsets[i])
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
