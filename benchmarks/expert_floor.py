"""The least a step of the medium config can cost on this CPU beside a smaller one: every distinct expert its
tokens route to is read once, at this machine's best time for reading an expert (random weights route each
token on its own: expected distinct experts of n tokens, E (1 - (1 - k / E)^n) where one token reads k)."""

import time

import numpy as np

from benchmarks.medium_config import MEDIUM


def expert_read_ms(rounds: int = 5) -> float:
    """This machine's least time to run one medium expert on one row with its weights not in cache (the
    experts kernel over 64 experts in turn, 400 MB, the best of `rounds`): what reading an expert costs."""
    from kernels.moe_expert import moe_expert

    hidden, inter, experts = MEDIUM["hidden_size"], MEDIUM["intermediate_size"], MEDIUM["num_local_experts"]
    rng = np.random.default_rng(0)
    w13 = rng.standard_normal((experts, 2 * inter, hidden), np.float32)
    w2 = rng.standard_normal((experts, hidden, inter), np.float32)
    x = rng.standard_normal((1, hidden), np.float32) * 1e-3
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for e in range(experts):
            moe_expert(x, w13[e], w2[e])
        best = min(best, (time.perf_counter() - start) / experts)
    return best * 1e3


def distinct_experts(tokens: int) -> float:
    """Expected distinct experts per layer that `tokens` independently routed tokens read."""
    experts, k = MEDIUM["num_local_experts"], MEDIUM["num_experts_per_tok"]
    return experts * (1 - (1 - k / experts) ** tokens)


def step_floor(base_ms: float, base_tokens: int, tokens: int, read_ms: float) -> dict:
    """The least a step of `tokens` tokens can take beside a measured step of `base_tokens` taking `base_ms`,
    with the same kernels: that step plus the distinct experts the other tokens add in every layer, each at
    `read_ms` (a floor: the other tokens' attention, lm_head and host work are left out)."""
    added = distinct_experts(tokens) - distinct_experts(base_tokens)
    ms = base_ms + MEDIUM["num_hidden_layers"] * added * read_ms
    return {"distinct_experts": distinct_experts(tokens), "expert_read_ms": read_ms, "ms": ms, "ratio": ms / base_ms}
