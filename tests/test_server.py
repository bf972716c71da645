"""The OpenAI-compatible server on 127.0.0.1, driven by the official `openai` client: non-streaming and
streaming chat, completions, reasoning and tool calls, two concurrent clients, bad requests."""

import json
import socket
import urllib.error
import urllib.request
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402
from test_chat import WEATHER  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from minimax_m2 import MiniMaxM2Model  # noqa: E402
from minimax_m2.generation import Sampling  # noqa: E402
from minimax_m2.server import Engine, build_app  # noqa: E402

SCRIPT = ("The user wants the weather.\n</think>\n\nLet me check.<minimax:tool_call>\n<invoke name=\"get_weather\">\n"
          "<parameter name=\"city\">Paris</parameter>\n<parameter name=\"days\">2</parameter>\n</invoke>\n</minimax:tool_call>")


def _serve(engine: Engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start within 20 s"
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def tokenizer(with_tokenizer) -> Tokenizer:
    return Tokenizer.from_file(str(with_tokenizer / "tokenizer.json"))


@pytest.fixture(scope="module")
def model_server(with_tokenizer, tokenizer):
    """The tiny checkpoint's model behind the server (greedy, 256-token context)."""
    model = MiniMaxM2Model.from_pretrained(with_tokenizer, max_seq_len=256)
    engine = Engine.for_model("tiny-m2", model, tokenizer, Sampling(max_new_tokens=8), with_tokenizer)
    server, thread, url = _serve(engine)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def scripted_server(tokenizer):
    """A server whose 'model' always answers SCRIPT: reasoning, text and a tool call, token by token."""
    script = tokenizer.encode(SCRIPT).ids

    def tokens(prompt: np.ndarray, sampling: Sampling):
        yield from script[: sampling.max_new_tokens]

    engine = Engine("scripted", tokenizer, tokens, 4096, Sampling(max_new_tokens=len(script)))
    server, thread, url = _serve(engine)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


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
    chunks = list(client(scripted_server).chat.completions.create(model="scripted", messages=messages, tools=[WEATHER],
                                                                  stream=True))
    streamed_calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [json.loads(t.function.arguments) for t in streamed_calls] == [{"city": "Paris", "days": 2}]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Let me check."


def test_stop_sequence(scripted_server) -> None:
    out = client(scripted_server).chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "x"}], stop=["check"])
    assert out.choices[0].message.content == "Let me " and out.choices[0].finish_reason == "stop"


def test_two_concurrent_clients_are_queued(model_server) -> None:
    def ask(text: str) -> str:
        reply = client(model_server).chat.completions.create(model="tiny-m2", messages=[{"role": "user", "content": text}],
                                                           max_tokens=5)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(ask, ["first", "second"]))
    assert together == [ask("first"), ask("second")], "a queued request must not disturb another's KV cache"


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), "does not exist"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 300}]}).encode(), "exceed the context"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(), "'temperature' must be"),
    (json.dumps({"messages": []}).encode(), "'messages' must be"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(model_server, body, message) -> None:
    request = urllib.request.Request(f"{model_server}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=30)
    assert raised.value.code == 400
    error = json.loads(raised.value.read())["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert client(model_server).models.list().data
