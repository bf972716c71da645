"""Shared tiny checkpoints, built once per test session by transformers."""

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_reference  # noqa: E402

PROMPT = np.array([[5, 17, 200, 3, 99, 42, 7], [250, 1, 64, 64, 12, 180, 33]])


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
DECODE_STEPS = 8


@pytest.fixture(scope="session", autouse=True)
def subprocess_temp_dir(tmp_path_factory) -> None:
    """Processes the tests start (torchrun keeps a log directory per run) write their temporary files under
    pytest's own temporary directory, which pytest prunes, not into /tmp."""
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("subprocess-tmp"))


@pytest.fixture(scope="session")
def hf_model():
    return hf_reference.build_model(hf_reference.tiny_config())


@pytest.fixture(scope="session")
def float32_checkpoint(hf_model, tmp_path_factory) -> Path:
    return hf_reference.save(hf_model, tmp_path_factory.mktemp("f32"))


@pytest.fixture(scope="session")
def sharded_checkpoint(hf_model, tmp_path_factory) -> Path:
    return hf_reference.save(hf_model, tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")


@pytest.fixture(scope="session")
def fp8_checkpoint(float32_checkpoint, tmp_path_factory) -> Path:
    return hf_reference.write_fp8(float32_checkpoint, tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="session")
def with_tokenizer(float32_checkpoint, tmp_path_factory) -> Path:
    """The float32 checkpoint plus a byte-level tokenizer of exactly its 256 ids: every byte one token,
    so a multi-byte character spans several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tokenized")
    for file in float32_checkpoint.iterdir():
        shutil.copy(file, path / file.name)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello"], trainer)
    assert tokenizer.get_vocab_size() == 256
    tokenizer.save(str(path / "tokenizer.json"))
    return path
