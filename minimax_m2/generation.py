"""Generation settings as transformers resolves them: the checkpoint's generation_config.json, then flags."""

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from minimax_m2 import checks
from minimax_m2.weights.files import read_json

MAX_LOGPROBS = 20  # alternatives a new token's log-probability comes with at most (the device returns 20)


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Sampling:
    """How one request generates; every field is checked when it is made (a ValueError naming the field), so
    that nothing invalid is ever admitted."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; n: each new token's log-probability and the n most likely ones'

    def __post_init__(self) -> None:
        problems = {
            "max_new_tokens": not (_integer(self.max_new_tokens) and self.max_new_tokens >= 1),
            "temperature": not (_real(self.temperature) and self.temperature >= 0),
            "top_k": self.top_k is not None and not (_integer(self.top_k) and self.top_k >= 1),
            "top_p": self.top_p is not None and not (_real(self.top_p) and 0 < self.top_p <= 1),
            "seed": self.seed is not None and not (_integer(self.seed) and 0 <= self.seed < 2**64),
            "eos_token_ids": not (isinstance(self.eos_token_ids, tuple)
                                  and all(_integer(t) and t >= 0 for t in self.eos_token_ids)),
            "logprobs": self.logprobs is not None and not (_integer(self.logprobs)
                                                           and 0 <= self.logprobs <= MAX_LOGPROBS),
        }
        wanted = {"max_new_tokens": "an integer >= 1", "temperature": "a finite number >= 0",
                  "top_k": "None or an integer >= 1", "top_p": "None or a number in (0, 1]",
                  "seed": "None or an integer in [0, 2**64)", "eos_token_ids": "a tuple of token ids",
                  "logprobs": f"None or an integer in [0, {MAX_LOGPROBS}]"}
        for name, bad in problems.items():
            if bad:
                raise ValueError(f"Sampling {name} must be {wanted[name]}, got {getattr(self, name)!r}")


_DEFAULTS = {
    "do_sample": checks.boolean,
    "temperature": lambda where, value: checks.number(where, value, 0, 1e4, low_open=False),
    "top_k": lambda where, value: checks.integer(where, value, 0),
    "top_p": lambda where, value: checks.number(where, value, 0, 1),
    "eos_token_id": lambda where, value: tuple(checks.integers(where, value)),
}


def checkpoint_defaults(path: Path | None) -> dict:
    """do_sample, temperature, top_k, top_p and eos_token_id (a tuple) of generation_config.json, each
    checked by type and range (empty when the file is absent; null values are left out)."""
    file = path / "generation_config.json" if path else None
    if file is None or not file.is_file():
        return {}
    raw = checks.mapping(str(file), read_json(file, ""))
    return {k: check(f"{file}: {k!r}", raw[k]) for k, check in _DEFAULTS.items() if raw.get(k) is not None}


def resolve_sampling(defaults: dict, max_new_tokens: int, temperature: float | None, top_k: int | None,
                     top_p: float | None, seed: int | None) -> tuple[Sampling, list[str]]:
    """Flags override the checkpoint's defaults; without do_sample the defaults are greedy.
    Returns the settings and warnings for flags that have no effect."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampled = defaults.get("do_sample", False)
    temperature = temperature if temperature is not None else (defaults.get("temperature", 1.0) if sampled else 0.0)
    top_k = top_k if top_k is not None else ((defaults.get("top_k") or None) if sampled else None)
    top_p = top_p if top_p is not None else (defaults.get("top_p") if sampled else None)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    warnings = []
    if temperature == 0 and (top_k is not None or top_p is not None):
        warnings.append("--top-k / --top-p have no effect at temperature 0 (greedy decoding)")
        top_k = top_p = None
    return Sampling(max_new_tokens, temperature, top_k, top_p, seed, defaults.get("eos_token_id", ())), warnings
