"""Which experts a run loads: `--experts` parsed and checked against the config."""

from minimax_m2.config import MiniMaxM2Config


def parse_experts(spec: str | None, num_experts: int) -> list[int] | None:
    """'0-7' or '0,3,5' or '0-3,8' -> ids, each in 0..num_experts-1 (checked before any range is
    expanded); None -> None (all)."""
    if not spec:
        return None
    ids = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"--experts takes ids and ranges like 0-7 or 0,3,5, got {spec!r}") from None
        if not 0 <= low <= high < num_experts:
            raise ValueError(f"--experts {part!r} is not an ascending range inside 0..{num_experts - 1}")
        ids.extend(range(low, high + 1))
    return ids


def select_experts(config: MiniMaxM2Config, experts: list[int] | None) -> list[int]:
    """The sorted expert ids to load (all when None); refuses ids out of range, repeats, or fewer than top-k."""
    if experts is None:
        return list(range(config.num_local_experts))
    chosen = sorted(int(e) for e in experts)
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"expert list {experts} repeats an expert")
    outside = [e for e in chosen if not 0 <= e < config.num_local_experts]
    if outside:
        raise ValueError(f"experts {outside} are outside 0..{config.num_local_experts - 1}")
    if len(chosen) < config.num_experts_per_tok:
        raise ValueError(
            f"{len(chosen)} experts loaded but each token needs {config.num_experts_per_tok} (num_experts_per_tok)"
        )
    return chosen
