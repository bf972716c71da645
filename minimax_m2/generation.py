"""Generation settings as transformers resolves them: the checkpoint's generation_config.json, then flags."""

import math
from dataclasses import dataclass
from pathlib import Path

from minimax_m2 import checks
from minimax_m2.weights.files import read_json


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; n: each new token's log-probability and the n most likely ones'


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
