"""The OpenAI-compatible server on 127.0.0.1, driven by the official `openai` client and raw sockets:
chat and completions (plain and streamed), reasoning and tool calls, concurrent clients batched by the
engine, and every way a client can misbehave: dropped streams, huge or trickled requests, malformed or
unsupported parameters. Every wait is bounded."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import free_port  # noqa: E402
from test_chat import WEATHER  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from minimax_m2 import MiniMaxM2Model  # noqa: E402
from minimax_m2.bounded_json import MAX_DEPTH  # noqa: E402
from minimax_m2.generation import Sampling  # noqa: E402
from minimax_m2.serving.engine import Engine  # noqa: E402
from minimax_m2.serving.server import Limits, ServedModel, make_server  # noqa: E402

SCRIPT = ("The user wants the weather.\n</think>\n\nLet me check.<minimax:tool_call>\n<invoke name=\"get_weather\">\n"
          "<parameter name=\"city\">Paris</parameter>\n<parameter name=\"days\">2</parameter>\n</invoke>\n"
          "</minimax:tool_call>")
LIMITS = Limits(max_body_bytes=64 << 10, body_seconds=3, header_seconds=2)


def _serve(served: ServedModel, limits: Limits = LIMITS):
    port = free_port()
    server = make_server(served, "127.0.0.1", port, limits, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start within 20 s"
    return server, thread, f"http://127.0.0.1:{port}", port


@pytest.fixture(scope="module")
def tokenizer(with_tokenizer) -> Tokenizer:
    return Tokenizer.from_file(str(with_tokenizer / "tokenizer.json"))


@pytest.fixture(scope="module")
def engine(with_tokenizer):
    model = MiniMaxM2Model.from_pretrained(with_tokenizer, max_seq_len=256)
    engine = Engine(model, max_num_seqs=4, prefill_chunk=64)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def model_server(with_tokenizer, tokenizer, engine):
    """The tiny checkpoint's model behind the engine and the server (greedy, 256-token context)."""
    served = ServedModel("tiny-m2", engine, tokenizer, Sampling(max_new_tokens=8), 256, with_tokenizer)
    server, thread, url, _ = _serve(served)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


class ScriptedEngine:
    """An engine whose 'model' answers SCRIPT token by token (`delay` seconds apart), honouring cancels."""

    def __init__(self, script: list[int], delay: float = 0.0):
        self.script, self.delay = script, delay
        self.running: set[int] = set()
        self.cancelled: list[object] = []

    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len + max_new_tokens > 4096:
            raise ValueError("does not fit")

    def submit(self, prompt, sampling, notify=None, keep_logits=False, constraint=None):
        request = type("Request", (), {"finish_reason": None})()

        def run() -> None:
            self.running.add(id(request))
            for token in self.script[: sampling.max_new_tokens]:
                if request in self.cancelled:
                    break
                if sampling.logprobs is not None:  # the token, then bytes 0x80, 0x81, ... (none whole UTF-8)
                    alternatives = [(token, -0.5)] + [(b, -1.0 - b / 1000) for b in range(0x80, 0x100) if b != token]
                    notify("logprobs", (-0.5, alternatives[: sampling.logprobs]))
                notify("token", token)
                time.sleep(self.delay)
            request.finish_reason = "length"
            self.running.discard(id(request))
            notify("finish", "length")

        threading.Thread(target=run, daemon=True).start()
        return request

    def cancel(self, request) -> None:
        self.cancelled.append(request)

    def load(self) -> dict:
        return {"running": len(self.running)}

    def counters(self) -> dict:
        return {}

    def stop(self, timeout: float = 10.0) -> None:
        pass


@contextmanager
def scripted(tokenizer, text: str, max_seq_len: int = 4096) -> Iterator[str]:
    """The URL of a server whose engine answers `text` token by token, stopped on exit."""
    script = tokenizer.encode(text).ids
    served = ServedModel("scripted", ScriptedEngine(script), tokenizer, Sampling(max_new_tokens=len(script)),
                         max_seq_len)
    server, thread, url, _ = _serve(served)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def scripted_server(tokenizer):
    with scripted(tokenizer, SCRIPT) as url:
        yield url


UNICODE = "Café 你好, São Paulo — ok"


@pytest.fixture(scope="module")
def unicode_server(tokenizer):
    """A scripted answer whose characters span several byte-level tokens each."""
    with scripted(tokenizer, UNICODE) as url:
        yield url


def client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)


def test_models(model_server) -> None:
    assert [m.id for m in client(model_server).models.list().data] == ["tiny-m2"]


def test_chat_non_streaming_and_streaming_agree(model_server) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    whole = client(model_server).chat.completions.create(model="tiny-m2", messages=messages, max_tokens=6)
    assert whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens > 0
    assert whole.choices[0].finish_reason == "length"
    stream = client(model_server).chat.completions.create(model="tiny-m2", messages=messages, max_tokens=6, stream=True,
                                                        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    message = whole.choices[0].message
    assert text == (message.content or "") and reasoning == (getattr(message, "reasoning_content", None) or "")
    assert chunks[-1].usage.completion_tokens == 6


def test_completions(model_server) -> None:
    out = client(model_server).completions.create(model="tiny-m2", prompt="Once upon", max_tokens=4)
    assert isinstance(out.choices[0].text, str) and out.usage.completion_tokens == 4


def test_reasoning_and_tool_calls(scripted_server) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    whole = client(scripted_server).chat.completions.create(model="scripted", messages=messages, tools=[WEATHER])
    message = whole.choices[0].message
    assert message.reasoning_content == "The user wants the weather.\n"
    assert message.content == "Let me check."
    assert whole.choices[0].finish_reason == "tool_calls"
    call = message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    chunks = list(client(scripted_server).chat.completions.create(model="scripted", messages=messages,
                                                                  tools=[WEATHER], stream=True))
    streamed_calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [json.loads(t.function.arguments) for t in streamed_calls] == [{"city": "Paris", "days": 2}]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."


def test_stop_sequence(scripted_server) -> None:
    out = client(scripted_server).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "x"}], stop=["check"])
    assert out.choices[0].message.content == "Let me " and out.choices[0].finish_reason == "stop"


def test_a_stop_string_in_the_reasoning_stops_generation(scripted_server) -> None:
    """Stop strings are matched against the whole output, reasoning included (as vLLM does)."""
    for stream in (False, True):
        out = client(scripted_server).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "x"}], stop=["weather"], tools=[WEATHER],
            stream=stream)
        chunks = list(out) if stream else None
        if stream:
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
            content = "".join(c.choices[0].delta.content or "" for c in chunks)
            calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            message = out.choices[0].message
            reasoning, content, calls = message.reasoning_content, message.content, message.tool_calls or []
            finish = [out.choices[0].finish_reason]
        assert (reasoning, content, calls, finish) == ("The user wants the ", "", [], ["stop"])


def test_logprobs_of_tokens_that_split_a_character(unicode_server) -> None:
    """Chat's `bytes` are each token's own: joined, they are the reply's UTF-8; completions' top_logprobs keep
    every alternative (partial tokens spelled `bytes:\\x..`), its tokens decode to the text and each offset
    is where its token starts."""
    chat = client(unicode_server).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=5)
    entries = chat.choices[0].logprobs.content
    message = chat.choices[0].message
    assert bytes(b for e in entries for b in e.bytes) == UNICODE.encode()
    assert (message.reasoning_content or "") + (message.content or "") == UNICODE  # the template opened <think>
    assert any(e.token.startswith("bytes:") for e in entries)
    assert all(len({t.token for t in e.top_logprobs}) == 5 for e in entries)
    for stream in (False, True):
        out = client(unicode_server).completions.create(model="scripted", prompt="x", logprobs=5, stream=stream)
        if stream:
            chunks = [c.choices[0] for c in out]
            text = "".join(c.text for c in chunks)
            tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
            offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
            tops = [t for c in chunks if c.logprobs for t in c.logprobs.top_logprobs]
        else:
            logprobs, text = out.choices[0].logprobs, out.choices[0].text
            tokens, offsets, tops = logprobs.tokens, logprobs.text_offset, logprobs.top_logprobs
        assert text == UNICODE
        assert_offsets_fit(tokens, offsets, text)
        assert all(len(top) == 5 for top in tops)


def test_a_body_as_deep_as_allowed_is_served(scripted_server) -> None:
    """A tool schema nesting 29 objects (the body 63 levels deep) renders and is served."""
    body = _with("tools", '[{"type": "function", "function": {"name": "f", "parameters": ' + nested_schema(29) + "}}]")
    code, reply = _post(scripted_server, "/v1/chat/completions", body[:-1] + b', "max_tokens": 2}')
    assert code == 200, reply


def test_whitespace_a_tokenizer_drops_does_not_count_against_the_context() -> None:
    """A word-level tokenizer (whitespace split, 4-character words): 900 words, 4,500 characters, fit a context
    of 1000 tokens, though 4,500 characters exceed 1000 x the longest token's 4."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100, 200)} | {"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with scripted(words, "w101 w102", max_seq_len=1000) as url:
        out = client(url).completions.create(model="scripted", prompt=" ".join(["w150"] * 900), max_tokens=2)
    assert out.usage.prompt_tokens == 900 and out.usage.completion_tokens == 2


def test_a_lone_surrogate_in_a_text_prompt_is_refused(model_server) -> None:
    code, reply = _post(model_server, "/v1/completions", b'{"prompt": "hi \\udc00"}')
    assert code == 400 and reply["error"]["param"] == "prompt" and "lone surrogate" in reply["error"]["message"]


def test_concurrent_clients_each_get_their_own_answer(model_server) -> None:
    """Requests of different lengths batched by the engine give what each gives alone."""
    def ask(text: str) -> str:
        reply = client(model_server).chat.completions.create(
            model="tiny-m2", messages=[{"role": "user", "content": text}], max_tokens=5)
        return reply.choices[0].message.content or ""

    texts = ["first", "the second one is longer", "3", "and a fourth, longer than all the others here"]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, texts))
    assert together == [ask(t) for t in texts], "a batched request must not disturb another's KV cache"


def test_n_choices_are_the_requests_seeded_seed_plus_index(model_server) -> None:
    """n = 3 sampled choices: choice i is what one request with seed + i gives; usage counts them all."""
    ask = dict(model="tiny-m2", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=11)
    whole = client(model_server).completions.create(n=3, **ask)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    alone = [client(model_server).completions.create(**{**ask, "seed": 11 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in whole.choices] == alone
    assert len(set(alone)) > 1, "the choices should differ"
    assert whole.usage.completion_tokens == 18


def test_n_choices_stream_interleaved_with_their_index(model_server, engine) -> None:
    """A streamed chat of n = 2: each choice's deltas carry its index and end with its own finish reason, and
    add up to the plain response; the second choice reuses the first one's prompt from the cache."""
    ask = dict(model="tiny-m2", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=5,
               temperature=1.0, seed=3, n=2)
    reused = engine.metrics()["reused_tokens"]
    whole = client(model_server).chat.completions.create(**ask)
    assert engine.metrics()["reused_tokens"] - reused >= whole.usage.prompt_tokens - 1
    chunks = [c for c in client(model_server).chat.completions.create(stream=True, **ask) if c.choices]
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine if c.finish_reason] == [whole.choices[i].finish_reason]
        assert "".join(c.delta.content or "" for c in mine) == (whole.choices[i].message.content or "")
    assert engine.metrics()["slots_busy"] == 0


def test_chat_logprobs_plain_and_streamed(model_server) -> None:
    """Each new token's log-probability with its 2 most likely alternatives; greedy, so the token is the
    first of them; the streamed chunks carry the same entries."""
    ask = dict(model="tiny-m2", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, logprobs=True,
               top_logprobs=2)
    whole = client(model_server).chat.completions.create(**ask)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens == 5
    message = whole.choices[0].message
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace") == \
        (message.reasoning_content or "") + (message.content or "")
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2 and bytes(entry.bytes) == token_bytes(entry.token)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    chunks = [c for c in client(model_server).chat.completions.create(stream=True, **ask) if c.choices]
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    plain = client(model_server).chat.completions.create(model="tiny-m2", messages=ask["messages"], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs(model_server) -> None:
    out = client(model_server).completions.create(model="tiny-m2", prompt="Once upon", max_tokens=4, logprobs=3)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert_offsets_fit(logprobs.tokens, logprobs.text_offset, out.choices[0].text)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == logprob and top[token] == logprob
    stream = client(model_server).completions.create(model="tiny-m2", prompt="Once upon", max_tokens=4, logprobs=3,
                                                     stream=True)
    chunks = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == logprobs.tokens
    assert [o for c in chunks for o in c.text_offset] == logprobs.text_offset


def token_bytes(spelling: str) -> bytes:
    """A token's bytes from its spelling: its text, or `bytes:\\xe4\\xbd` for bytes that are not whole UTF-8."""
    if spelling.startswith("bytes:"):
        return bytes.fromhex(spelling.removeprefix("bytes:").replace("\\x", ""))
    return spelling.encode()


def assert_offsets_fit(tokens: list[str], offsets: list[int], text: str) -> None:
    """Completions' tokens decode to the text, and each token's offset is where its text starts in it."""
    assert b"".join(map(token_bytes, tokens)).decode("utf-8", "replace") == text
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for token, offset in zip(tokens, offsets):
        if not token.startswith("bytes:"):
            assert text[offset:offset + len(token)] == token


def _post(url: str, path: str, body: bytes, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def nested(depth: int) -> str:
    """{"a": {"a": ... {}}}: `depth` objects inside each other, as JSON text (deeper than json.dumps goes)."""
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


def nested_schema(depth: int) -> str:
    """A JSON schema whose objects nest `depth` levels (two JSON levels each), as JSON text."""
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth


def _with(field: str, text: str) -> bytes:
    """A chat body whose `field` is the JSON text given."""
    return b'{"messages": [{"role": "user", "content": "x"}], "' + field.encode() + b'": ' + text.encode() + b"}"


def _chat(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x"}], **fields}).encode()


@pytest.mark.parametrize("body, status, param, message", [
    (b"{not json", 400, None, "not valid JSON"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model",
     "does not exist"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 300}]}).encode(), 400, "max_tokens",
     "exceed the context"),
    (_chat(temperature=-1), 400, "temperature", "'temperature' must be"),
    (json.dumps({"messages": []}).encode(), 400, "messages", "'messages' must be"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "messages", "role must be one of"),
    (json.dumps({"messages": [{"role": "user", "content": 7}]}).encode(), 400, "messages", "content must be a string"),
    (json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": "f()"}]}).encode(), 400, "messages",
     "tool_calls must be a list"),
    (json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": None}]}]}).encode(), 400,
     "messages", "tool_calls[0] must be"),
    (_chat(tools="get_weather"), 400, "tools", "'tools' must be a list"),
    (_chat(tools=[1, 2]), 400, "tools", "tools[0] must be"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]), 400, "tools",
     "tools[0] must be"),
    (_chat(stream_options="yes"), 400, "stream_options", "'stream_options' must be"),
    (_chat(stream="no"), 400, "stream", "'stream' must be true or false"),
    (_chat(n=0), 400, "n", "'n' must be an integer in [1, 16]"),
    (_chat(n=17), 400, "n", "'n' must be an integer in [1, 16]"),
    (_chat(n=1.5), 400, "n", "'n' must be an integer"),
    (_chat(logprobs="yes"), 400, "logprobs", "'logprobs' must be true or false"),
    (_chat(top_logprobs=3), 400, "top_logprobs", "'top_logprobs' needs 'logprobs': true"),
    (_chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "'top_logprobs' must be an integer in [0, 20]"),
    (_chat(response_format={"type": "yaml"}), 400, "response_format", "'response_format' must be"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": []}}), 400,
     "response_format", "'response_format.json_schema' must be"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}), 400,
     "response_format", "cannot be followed"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(a"}}}), 400, "response_format", "cannot be followed"),
    (_chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}),
     400, "response_format", "cannot be followed"),
    (_chat(tool_choice="required"), 400, "tool_choice", "needs 'tools'"),
    (_chat(tool_choice="sometimes"), 400, "tool_choice", "'tool_choice' must be"),
    (_chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), 400, "tool_choice",
     "not among 'tools'"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": "low"}}}}}], tool_choice="required"), 400, "tools", "cannot be followed"),
    (_chat(frobnicate=1), 400, "frobnicate", "unknown parameter"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 60000}]}).encode(), 400, "messages",
     "characters besides whitespace cannot fit"),
    (_with("metadata", nested(5000)), 400, None, "nested 5001 levels deep"),
    (b'{"prompt": ' + b"[" * 30000 + b"]" * 30000 + b"}", 400, None, "nested 30001 levels deep"),
    (_with("tools", '[{"type": "function", "function": {"name": "f", "parameters": ' + nested_schema(900) + "}}]"),
     400, None, "levels deep; at most 64"),
    (_with("metadata", nested(MAX_DEPTH)), 400, None, f"nested {MAX_DEPTH + 1} levels deep"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages", "messages[0].content holds a "
     "lone surrogate"),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "description": "\ud800"}}]).replace(
        b"\\\\ud800", b"\\ud800"), 400, "tools", "tools[0].function.description holds a lone surrogate"),
    (_chat(stop=["\udfff"]).replace(b"\\\\udfff", b"\\udfff"), 400, "stop", "lone surrogate"),
    (_chat(max_completion_tokens=5, max_tokens="garbage"), 400, "max_tokens", "'max_tokens' must be an integer"),
    (_chat(max_completion_tokens=0, max_tokens=5), 400, "max_completion_tokens", "'max_completion_tokens' must be"),
    (json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": False}}]}]}).encode(), 400, "messages",
     "arguments must be a string holding a JSON object, got bool"),
    (json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": []}}]}]}).encode(), 400, "messages",
     "arguments must be a string holding a JSON object, got list"),
    (json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}).encode(), 400, "messages",
     "arguments must hold a JSON object"),
    (json.dumps({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[" * 70 + "]" * 70}}]}]}).encode(), 400,
     "messages", "levels deep"),
    (_chat(user=5), 400, "user", "'user' must be a string"),
    (_chat(parallel_tool_calls="yes"), 400, "parallel_tool_calls", "must be true or false"),
    (_chat(tools=[1], tool_choice="none"), 400, "tools", "tools[0] must be"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(model_server, body, status, param,
                                                                       message) -> None:
    code, reply = _post(model_server, "/v1/chat/completions", body)
    assert code == status, reply
    error = reply["error"]
    assert message in error["message"] and error["param"] == param and error["type"]
    assert client(model_server).models.list().data


def test_too_large_a_body_gets_413_before_it_is_read(model_server) -> None:
    code, reply = _post(model_server, "/v1/chat/completions", _chat(pad="x" * (LIMITS.max_body_bytes + 10)))
    assert code == 413 and "exceeds" in reply["error"]["message"]


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)])
def test_unknown_routes_and_methods_get_an_openai_error(model_server, method, path, status) -> None:
    request = urllib.request.Request(f"{model_server}{path}", method=method)
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == status
    assert set(json.loads(raised.value.read())["error"]) == {"message", "type", "param", "code"}


def _metrics_text(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _metric(url: str, name: str) -> float:
    return float(next(line.split()[1] for line in _metrics_text(url).splitlines()
                      if line.startswith(f"minimax_m2_{name} ")))


@pytest.mark.parametrize("n", [1, 3])
def test_a_dropped_stream_frees_its_slot_and_the_next_request_is_served(model_server, n) -> None:
    """A client reads part of a long streamed completion (of n choices) and closes the connection: its
    generation stops (every slot it held is free again within seconds), and the next request is answered
    at once."""
    host, port = model_server.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 100,
                       "stream": True, "n": n}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received, deadline = b"", time.monotonic() + 20
        while (received.count(b"data:") < 3 * n or _metric(model_server, "running") < n) and \
                time.monotonic() < deadline:
            received += raw.recv(4096)
        assert b"200 OK" in received and received.count(b"data:") >= 3 * n, received[:300]
        assert _metric(model_server, "running") == n
    deadline = time.monotonic() + 15
    while _metric(model_server, "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(model_server, "running") == 0, "the dropped request kept running"
    start = time.monotonic()
    reply = client(model_server).chat.completions.create(model="tiny-m2", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=3)
    assert reply.usage.completion_tokens == 3 and time.monotonic() - start < 10


def test_a_dropped_plain_request_is_cancelled(tokenizer) -> None:
    """A non-streaming client that goes away cancels its request too."""
    engine = ScriptedEngine(tokenizer.encode(SCRIPT).ids * 20, delay=0.05)
    served = ServedModel("scripted", engine, tokenizer, Sampling(max_new_tokens=400), 4096)
    server, thread, url, port = _serve(served)
    try:
        body = _chat(max_tokens=400)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 10
            while not engine.running and time.monotonic() < deadline:
                time.sleep(0.02)
        deadline = time.monotonic() + 10
        while not engine.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.cancelled, "the request of a client that left was not cancelled"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_trickled_headers_are_cut_off(model_server) -> None:
    """40 connections that send header bytes slowly are closed after the header timeout; the server answers."""
    host, port = model_server.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(40)]
    try:
        start = time.monotonic()
        for _ in range(int(LIMITS.header_seconds / 0.25) + 8):
            for s in sockets:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass
            time.sleep(0.25)
        closed = 0
        for s in sockets:
            s.settimeout(1)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(sockets), f"{len(sockets) - closed} trickling connections still open"
        assert time.monotonic() - start < 30
        assert client(model_server).models.list().data
    finally:
        for s in sockets:
            s.close()


def test_metrics_report_the_engine(model_server) -> None:
    """Prometheus text: the load as gauges, and what only grows as counters named `_total`."""
    for name in ("queue_depth", "running", "slots_busy", "slot_occupancy", "generated_tokens_total",
                 "prefill_seconds_total", "decode_seconds_total"):
        assert _metric(model_server, name) >= 0
    assert _metric(model_server, "slots") == 4
    assert _metric(model_server, "blocks") == 8  # 4 rows x 256 positions in blocks of 128
    used, cached, free = (_metric(model_server, f"blocks_{kind}") for kind in ("used", "cached", "free"))
    assert used + cached + free == 8 and _metric(model_server, "preemptions_total") >= 0
    text = _metrics_text(model_server)
    assert "# TYPE minimax_m2_running gauge" in text and "# TYPE minimax_m2_steps_total counter" in text
    assert "# TYPE minimax_m2_blocks_cached gauge" in text and "# TYPE minimax_m2_reused_tokens_total counter" in text
