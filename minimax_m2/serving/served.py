"""What the server serves: the engine behind it (or its multi-rank front), the tokenizer, the generation
defaults and the context length."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from minimax_m2.generation import Sampling
from minimax_m2.serving.detokenize import TokenBytes


class EngineLike(Protocol):
    """What the server needs of an engine (`minimax_m2.serving.engine.Engine`, or its multi-rank front)."""

    def check(self, prompt_len: int, max_new_tokens: int) -> None: ...

    def submit(self, prompt: list[int], sampling: Sampling, notify: Any = None, keep_logits: bool = False,
               constraint: Any = None) -> Any: ...

    def cancel(self, request: Any) -> None: ...

    def load(self) -> dict[str, float]: ...

    def counters(self) -> dict[str, float]: ...

    def stop(self, timeout: float = 10.0) -> None: ...


@dataclass
class ServedModel:
    """What the server serves: a name, the engine, the tokenizer, generation defaults, the context length."""

    name: str
    engine: EngineLike
    tokenizer: Any
    defaults: Sampling
    max_seq_len: int
    chat_source: Path | None = None  # checkpoint (or prepared) directory whose chat template to use
    vocab_size: int = 0  # the model's (its lm_head's columns); 0: the tokenizer's

    def __post_init__(self) -> None:
        """The grammar engine over the tokenizer (None, with the reason, where it cannot be: structured output is
        then refused)."""
        self.grammars, self.no_grammars = None, ""
        try:
            from minimax_m2.serving.constraint import Grammars

            self.grammars = Grammars(self.tokenizer, self.vocab_size or self.tokenizer.get_vocab_size(),
                                     self.defaults.eos_token_ids)
        except ImportError:
            self.no_grammars = "it needs the llguidance package: pip install -e '.[serve]'"
        except ValueError as err:
            self.no_grammars = f"llguidance cannot read this tokenizer ({err})"
        vocab = self.tokenizer.get_vocab()
        # the most characters one token can stand for: a text longer than the context times this cannot fit
        self.max_token_chars = max(4, max((len(t) for t in vocab), default=1))
        self.token_bytes = TokenBytes(self.tokenizer)
