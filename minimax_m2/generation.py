"""Generation settings as transformers resolves them: the checkpoint's generation_config.json, then flags."""

import math
from dataclasses import dataclass
from pathlib import Path

from minimax_m2.files import read_json


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()


def checkpoint_defaults(path: Path | None) -> dict:
    """do_sample, temperature, top_k, top_p and eos_token_id of generation_config.json (empty when absent)."""
    file = path / "generation_config.json" if path else None
    if file is None or not file.is_file():
        return {}
    raw = read_json(file, "")
    return {k: raw[k] for k in ("do_sample", "temperature", "top_k", "top_p", "eos_token_id") if k in raw}


def resolve_sampling(defaults: dict, max_new_tokens: int, temperature: float | None, top_k: int | None,
                     top_p: float | None, seed: int | None) -> tuple[Sampling, list[str]]:
    """Flags override the checkpoint's defaults; without do_sample the defaults are greedy.
    Returns the settings and warnings for flags that have no effect."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampled = defaults.get("do_sample", False)
    temperature = temperature if temperature is not None else (defaults.get("temperature", 1.0) if sampled else 0.0)
    top_k = top_k if top_k is not None else (defaults.get("top_k") if sampled else None)
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
    eos = defaults.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return Sampling(max_new_tokens, temperature, top_k, top_p, seed, eos_ids), warnings
