"""Structured output: the grammar's token mask on the device equals llguidance's own reference, greedy under a
constraint is the argmax over the allowed tokens (device and host sampling paths), reasoning stays free, and
through the OpenAI API every constrained reply parses and validates against its schema, or ends "length"."""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from conftest import free_port  # noqa: E402
from llguidance.numpy import apply_token_bitmask_inplace  # noqa: E402
from thread_ranks import ThreadCollectives  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from kernels import collectives  # noqa: E402
from kernels.lm_head import gather_vocab, vocab_slice_logits  # noqa: E402
from kernels.token_mask import mask_logits  # noqa: E402
from minimax_m2 import MiniMaxM2Model  # noqa: E402
from minimax_m2.device.program import rank_masks  # noqa: E402
from minimax_m2.device.units import lm_head_unit  # noqa: E402
from minimax_m2.generation import Sampling  # noqa: E402
from minimax_m2.sampling import draw, sampling_probs, token_logprobs  # noqa: E402
from minimax_m2.serving import grammars  # noqa: E402
from minimax_m2.serving.constraint import Grammars  # noqa: E402
from minimax_m2.serving.engine import Engine  # noqa: E402
from minimax_m2.serving.server import ServedModel, make_server  # noqa: E402

SCHEMAS = {
    "object": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                "ok": {"type": "boolean"}}, "required": ["name", "ok"],
               "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1,
              "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "nested": {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}, "tags": {"type": "array", "items": {
            "enum": ["a", "b"]}, "maxItems": 2}}, "required": ["point", "tags"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                  "note": {"type": "string", "maxLength": 4}},
                 "required": ["id"], "additionalProperties": False},
    "range": {"type": "object", "properties": {"t": {"type": "number", "minimum": -1, "maximum": 1},
                                               "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 12}},
              "required": ["t", "n"], "additionalProperties": False},
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 5}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"type": "string", "enum": ["c", "f"]}, "hourly": {"type": "boolean"}}, "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"]}}}]


@pytest.fixture(scope="module")
def tokenizer(with_tokenizer) -> Tokenizer:
    return Tokenizer.from_file(str(with_tokenizer / "tokenizer.json"))


@pytest.fixture(scope="module")
def model(with_tokenizer) -> MiniMaxM2Model:
    return MiniMaxM2Model.from_pretrained(with_tokenizer, max_seq_len=256)


def _bitmasks(rows: int, vocab: int, seed: int) -> np.ndarray:
    bits = np.random.default_rng(seed).random((rows, -(-vocab // 32) * 32)) < 0.3
    return np.packbits(bits, axis=1, bitorder="little").view(np.int32)


def test_the_device_mask_is_llguidances_own() -> None:
    """`mask_logits` forbids exactly the tokens llguidance's NumPy reference forbids; a free row is unchanged."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 300)).astype(np.float32)
    masks = _bitmasks(3, 300, 1)
    index = np.array([0, -1, 2, 1, 0], np.int32)
    got = mask_logits(logits, masks, index)
    want = logits.copy()
    constrained = index >= 0
    rows = want[constrained]
    apply_token_bitmask_inplace(rows, masks[index[constrained]])
    want[constrained] = rows
    assert np.array_equal(np.isinf(want), got <= -1e30) and np.array_equal(got[~np.isinf(want)], want[~np.isinf(want)])
    assert np.array_equal(got[1], logits[1])


@pytest.mark.parametrize("world", [1, 2])
def test_greedy_sampled_and_scored_tokens_respect_the_mask_over_vocabulary_slices(world) -> None:
    """The lm_head over W vocabulary slices, each rank with its slice of the masks: greedy is the argmax of
    the allowed logits, a sampled token is allowed, and log-probabilities are of the allowed distribution."""
    hidden, vocab, rows = 16, 301, 4
    rng = np.random.default_rng(2)
    h = rng.standard_normal((rows, hidden)).astype(np.float32)
    weight = rng.standard_normal((hidden, vocab)).astype(np.float32)
    norm = np.ones(hidden, np.float32)
    masks, index = _bitmasks(2, vocab, 3), np.array([0, 1, -1, 0], np.int32)
    columns = -(-vocab // world)
    padded = np.pad(weight, ((0, 0), (0, columns * world - vocab)))
    full = gather_vocab(vocab_slice_logits(h, norm, weight, np.zeros(2, np.int32), eps=1e-6, vocab_size=vocab),
                        vocab, None)
    reference = full.copy()  # the allowed logits, forbidden ones at -inf
    for row in (0, 1, 3):
        apply_token_bitmask_inplace(reference[row][None], masks[index[row]][None])
    temperature = np.array([0, 0.8, 0.8, 0], np.float32)

    def rank(r: int):
        offset = np.array([r * columns, 0], np.int32)
        return lm_head_unit(h, np.arange(rows, dtype=np.int32), norm, padded[:, r * columns:(r + 1) * columns],
                            offset, temperature, np.array([0, 5, 5, 0], np.int32), np.ones(rows, np.float32),
                            np.array([0.1, 0.7, 0.4, 0.9], np.float32), rank_masks(masks, r * columns, columns), index,
                            eps=1e-6, vocab_size=vocab, dp=1, tp=world, candidates=8, logprobs=3, return_logits=False,
                            rows_apart=False, world_groups=[list(range(world))])

    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        ids, chosen, top, top_ids = backend.run(rank)[0]
    finally:
        collectives.set_backend(None)
    assert ids[0] == np.argmax(reference[0]) and ids[3] == np.argmax(reference[3])
    assert np.isfinite(reference[1, ids[1]]), "a sampled token is allowed"
    for row in (0, 1, 3):
        want, want_top = token_logprobs(np.where(np.isinf(reference[row]), -1e30, reference[row]), int(ids[row]), 3)
        assert np.isclose(chosen[row], want, atol=1e-5)
        assert [int(i) for i in top_ids[row]] == [i for i, _ in want_top]


def _reference(model: MiniMaxM2Model, matcher, prompt: list[int], sampling: Sampling) -> list[int]:
    """The host's constrained decoding, token by token: the model's logits of the whole sequence, masked by
    llguidance's reference, then the argmax (temperature 0) or a draw from them with the request's generator."""
    reference = Engine(model, max_num_seqs=2, prefill_chunk=64, prefix_reuse=False)
    rng = np.random.default_rng(sampling.seed)
    mask = np.zeros((1, -(-model.config.vocab_size // 32)), np.int32)
    tokens: list[int] = []
    while len(tokens) < sampling.max_new_tokens and not matcher.is_stopped():
        logits = reference.generate([prompt + tokens], Sampling(max_new_tokens=1), keep_logits=True)[0].logits[-1]
        llguidance.numpy.fill_next_token_bitmask(matcher, mask)
        apply_token_bitmask_inplace(logits[None], mask)
        if sampling.temperature == 0:
            token = int(np.argmax(logits))
        else:
            token = draw(sampling_probs(np.where(np.isinf(logits), -1e30, logits), sampling.temperature, None,
                                        sampling.top_p), float(rng.random()))
        assert matcher.consume_token(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy-on-the-device", "sampled-on-the-host"])
def test_constrained_tokens_are_the_hosts_reference(model, tokenizer, temperature) -> None:
    """Greedy under a constraint is the argmax of the same logits over the allowed tokens, and a draw on the
    host (no top_k) is the draw from the allowed distribution, each request batched with others."""
    engine_grammars = Grammars(tokenizer, model.config.vocab_size, ())
    compiled = engine_grammars.compile(grammars.json_answer(SCHEMAS["nested"]))
    prompts = [list(b"point:"), list(b"Give me JSON, please"), list(b"x")]
    sampling = Sampling(max_new_tokens=40, temperature=temperature, seed=5)
    engine = Engine(model, max_num_seqs=4, prefill_chunk=8)
    requests = [engine.submit(p, sampling, constraint=engine_grammars.constraint(compiled, False)) for p in prompts]
    while not engine.idle():
        engine.step()
    for prompt, request in zip(prompts, requests):
        assert request.generated == _reference(model, compiled.deep_copy(), prompt, sampling)
        if request.finish_reason == "stop":
            jsonschema.validate(json.loads(tokenizer.decode(request.generated)), SCHEMAS["nested"])
    assert engine_grammars.stats["masked_rows"] > 0


def test_reasoning_is_free_but_cannot_end_the_reply(tokenizer) -> None:
    """While reasoning lasts a constrained row may choose anything but the end; after </think> the grammar holds."""
    held = Grammars(tokenizer, 256, (0,))
    constraint = held.constraint(held.compile(grammars.json_answer(None)), reasoning_open=True)
    assert not constraint.active
    mask = held._fill([constraint], 2)
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")
    assert bits[0, 0] == 0 and bits[0, 1:256].all() and not bits[1].any()
    for token in tokenizer.encode("I think a list </think>").ids:
        assert constraint.advance(token)
    assert constraint.active
    bits = np.unpackbits(held._fill([constraint], 2).view(np.uint8), axis=1, bitorder="little")[0]
    assert set(tokenizer.decode([t]) for t in np.flatnonzero(bits[:256])) == {"{", "\n"}
    assert not constraint.advance(tokenizer.encode("[").ids[0]), "the grammar refuses what it does not allow"


def _no_reasoning(with_tokenizer, tmp_path_factory):
    """The tiny checkpoint with a chat template that does not open reasoning (a random model never closes it)."""
    path = tmp_path_factory.mktemp("no-reasoning")
    for file in with_tokenizer.iterdir():
        shutil.copy(file, path / file.name)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    return path


@pytest.fixture(scope="module")
def server(with_tokenizer, tmp_path_factory, tokenizer) -> str:
    model = MiniMaxM2Model.from_pretrained(with_tokenizer, max_seq_len=256)
    engine = Engine(model, max_num_seqs=16, prefill_chunk=64)
    engine.start()
    served = ServedModel("tiny-m2", engine, tokenizer, Sampling(max_new_tokens=8), 256,
                         _no_reasoning(with_tokenizer, tmp_path_factory))
    port = free_port()
    server = make_server(served, "127.0.0.1", port, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    engine.stop()


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _json_choices(url: str, name: str, chat: bool, stream: bool, seed: int) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice of one request asking for SCHEMAS[name]."""
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    settings = dict(model="tiny-m2", max_tokens=48, temperature=0.8 + 0.05 * (seed % 5), seed=seed, n=1 + seed % 3,
                    stream=stream, extra_body={"response_format": fmt, "top_k": [-1, 40][seed % 2]})
    client = _client(url)
    if chat:
        reply = client.chat.completions.create(messages=[{"role": "user", "content": f"{name} #{seed}"}], **settings)
    else:
        reply = client.completions.create(prompt=f"{name} #{seed}:", **settings)
    if not stream:
        return [((c.message.content if chat else c.text) or "", c.finish_reason) for c in reply.choices]
    texts, finish = {}, {}
    for chunk in reply:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + ((c.delta.content if chat else c.text) or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts.get(i, ""), finish[i]) for i in sorted(finish)]


def test_every_constrained_reply_parses_and_validates(server) -> None:
    """Over 200 seeded requests across object, array, enum, nested, optional-field and number-range schemas,
    chat and completions, plain and streamed, n of 1 to 3: a reply that stops is JSON of its schema; one that
    runs out of tokens ends "length"."""
    jobs = [(name, chat, stream, seed) for seed in range(9) for name in SCHEMAS for chat in (False, True)
            for stream in (False, True)][:216]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: (job[0], _json_choices(server, *job)), jobs))
    finished = {"stop": 0, "length": 0}
    for name, choices in results:
        for text, reason in choices:
            finished[reason] += 1
            if reason == "stop":
                jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert sum(finished.values()) >= 400 and finished["stop"] >= 0.8 * sum(finished.values()), finished
    lines = _client(server).with_options().models.list()  # still serving
    assert lines.data


def test_a_schema_that_cannot_finish_in_time_ends_length(server) -> None:
    choice = _client(server).chat.completions.create(
        model="tiny-m2", messages=[{"role": "user", "content": "x"}], max_tokens=3,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested"]}}).choices[0]
    assert choice.finish_reason == "length"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_match_their_schemas(server, tool_choice) -> None:
    """tool_choice "required" or a named function: every reply is MiniMax-M2 tool calls whose arguments
    validate against the tool's parameters (exactly the named one when named)."""
    client = _client(server)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    def ask(seed: int):
        return client.chat.completions.create(
            model="tiny-m2", messages=[{"role": "user", "content": f"call #{seed}"}], max_tokens=200, tools=TOOLS,
            tool_choice=tool_choice, parallel_tool_calls=seed % 2 == 0, temperature=0.9, seed=seed,
            extra_body={"top_k": 20}).choices[0]

    with ThreadPoolExecutor(12) as pool:
        choices = list(pool.map(ask, range(12)))
    calls = 0
    for choice in choices:
        if choice.finish_reason == "length" and not choice.message.tool_calls:
            continue
        assert choice.finish_reason == "tool_calls" and not (choice.message.content or "").strip()
        for call in choice.message.tool_calls:
            if isinstance(tool_choice, dict):
                assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            calls += 1
    assert calls >= 8


def test_tool_choice_none_never_starts_a_call_and_metrics_count_masks(server) -> None:
    client = _client(server)
    before = _metric(server, "masked_rows_total")
    for seed in range(3):
        choice = client.chat.completions.create(
            model="tiny-m2", messages=[{"role": "user", "content": "<minimax:tool_call>"}], max_tokens=40,
            tools=TOOLS, tool_choice="none", temperature=1.0, seed=seed).choices[0]
        assert not choice.message.tool_calls and "<minimax:tool_call>" not in (choice.message.content or "")
    assert _metric(server, "masked_rows_total") > before and _metric(server, "mask_seconds_total") > 0


def _metric(url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"minimax_m2_{name} ")))
