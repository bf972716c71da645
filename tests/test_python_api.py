"""The Python API (`Sampling`, `Engine.generate`, `Engine.submit`) checks everything before it admits anything:
invalid settings and prompts are a ValueError naming the field, nothing is queued, and a step that fails
releases every request it touched and leaves the engine usable."""

import math
import threading

import numpy as np
import pytest

from minimax_m2 import MiniMaxM2Model
from minimax_m2.generation import Sampling
from minimax_m2.run import random_config
from minimax_m2.serving.engine import Engine


@pytest.fixture(scope="module")
def model() -> MiniMaxM2Model:
    return MiniMaxM2Model.random(random_config(128, 1, 4, 2, 64), seed=0, max_seq_len=32)


@pytest.mark.parametrize("field, value", [
    ("temperature", math.inf), ("temperature", math.nan), ("temperature", -0.5), ("temperature", "1"),
    ("top_k", -1), ("top_k", 0), ("top_k", 2.5), ("top_p", 0), ("top_p", 1.5), ("top_p", math.nan),
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("max_new_tokens", 2.5), ("max_new_tokens", True),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0), ("logprobs", 21), ("logprobs", -1), ("eos_token_ids", (1.5,)),
    ("eos_token_ids", [1]),
])
def test_invalid_sampling_is_refused_when_made(field, value) -> None:
    with pytest.raises(ValueError, match=f"Sampling {field} must be"):
        Sampling(**{field: value})


def test_valid_sampling_is_taken() -> None:
    assert Sampling(max_new_tokens=np.int64(4), temperature=0.7, top_k=40, top_p=1, seed=2**64 - 1,
                    eos_token_ids=(0, 2), logprobs=20).top_k == 40


def test_no_prompts_is_no_results(model) -> None:
    engine = Engine(model, max_num_seqs=2)
    done = []
    worker = threading.Thread(target=lambda: done.append(engine.generate([], Sampling(max_new_tokens=2))))
    worker.start()
    worker.join(timeout=10)
    assert done == [[]]


@pytest.mark.parametrize("prompts, settings, message", [
    ([[5, 6, 7], [8, 9]], [Sampling(max_new_tokens=4)], "2 prompts but 1 sampling settings"),
    ([[5, 6, 7], [5, 999]], Sampling(max_new_tokens=2), "prompt 1: token ids \\[999\\] are outside the vocabulary"),
    ([[5, 6, 7], [5, 5.7]], Sampling(max_new_tokens=2), "prompt 1: token ids must be integers"),
    ([[5, 6, 7], []], Sampling(max_new_tokens=2), "prompt 1: the prompt is empty"),
    ([[5, 6, 7], "hello"], Sampling(max_new_tokens=2), "prompt 1: a prompt must be a list of token ids"),
    ([[5, 6, 7]], [{"max_new_tokens": 2}], "prompt 0: sampling must be a Sampling"),
    ([[5] * 30], Sampling(max_new_tokens=4), "exceed the context of 32 tokens"),
])
def test_generate_checks_every_prompt_before_queueing_any(model, prompts, settings, message) -> None:
    engine = Engine(model, max_num_seqs=2)
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, settings)
    assert engine.idle() and engine.metrics()["queue_depth"] == 0
    assert [r.finish_reason for r in engine.generate([[5, 6]], Sampling(max_new_tokens=2))] == ["length"]


def test_a_second_engine_takes_the_model_only_from_an_idle_one(model) -> None:
    first = Engine(model, max_num_seqs=2)
    want = first.generate([[1, 2, 3]], Sampling(max_new_tokens=3))[0].generated
    first.submit([4, 5], Sampling(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="requests in flight"):
        Engine(model, max_num_seqs=2)
    while not first.idle():
        first.step()
    second = Engine(model, max_num_seqs=3)
    with pytest.raises(RuntimeError, match="now serves a newer Engine"):
        first.generate([[1, 2, 3]], Sampling(max_new_tokens=3))
    assert second.generate([[1, 2, 3]], Sampling(max_new_tokens=3))[0].generated == want


def test_a_failed_step_releases_its_requests_and_the_engine_goes_on(model) -> None:
    engine = Engine(model, max_num_seqs=2)
    prompts = [[1, 2, 3], [7, 8]]
    want = [r.generated for r in engine.generate(prompts, Sampling(max_new_tokens=4))]
    execute, calls = engine.executor.execute, []

    def fails_on_the_third_step(step):
        calls.append(step)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return execute(step)

    engine.executor.execute = fails_on_the_third_step
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(prompts, Sampling(max_new_tokens=4))
    metrics = engine.metrics()
    assert metrics["slots_busy"] == 0 and metrics["running"] == 0 and metrics["queue_depth"] == 0
    assert [r.generated for r in engine.generate(prompts, Sampling(max_new_tokens=4))] == want
