"""A subset holding every expert the tokens choose gives the full model's logits."""

import numpy as np
import pytest
import torch
from conftest import DECODE_STEPS, PROMPT
from hf_reference import build_model, relative_error, save, tiny_config

from minimax_m2 import MiniMaxM2Model

FAVOURED = [1, 4, 6, 9, 11, 14]


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Checkpoint whose router bias makes every token choose among FAVOURED, and the experts it chose."""
    reference = build_model(tiny_config(), seed=7, bias_shift={e: 1.0 for e in FAVOURED})
    chosen: set[int] = set()
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _i, out: chosen.update(out[2].flatten().tolist()))
        for layer in reference.model.layers
    ]
    with torch.no_grad():
        reference.generate(torch.tensor(PROMPT), max_new_tokens=DECODE_STEPS, do_sample=False)
    for hook in hooks:
        hook.remove()
    return save(reference, tmp_path_factory.mktemp("skewed")), sorted(chosen)


def test_subset_with_all_chosen_experts_matches_full(skewed) -> None:
    path, chosen = skewed
    assert set(chosen) <= set(FAVOURED) and len(chosen) < 16
    full_tokens, full_logits = MiniMaxM2Model.from_pretrained(path, max_seq_len=32).generate(
        PROMPT, max_new_tokens=DECODE_STEPS, return_logits=True
    )
    subset = MiniMaxM2Model.from_pretrained(path, experts=chosen, max_seq_len=32)
    assert subset.weights.layers[0].w13.shape[0] == len(chosen)
    tokens, logits = subset.generate(PROMPT, max_new_tokens=DECODE_STEPS, return_logits=True)
    assert relative_error(logits, full_logits) < 1e-5
    np.testing.assert_array_equal(tokens, full_tokens)


def test_subset_missing_a_chosen_expert_differs(skewed) -> None:
    path, chosen = skewed
    others = [e for e in range(16) if e not in chosen]
    full = MiniMaxM2Model.from_pretrained(path, max_seq_len=16).forward(PROMPT)
    partial = MiniMaxM2Model.from_pretrained(path, experts=chosen[1:] + others[:1], max_seq_len=16).forward(PROMPT)
    assert relative_error(partial, full) > 1e-3


@pytest.mark.parametrize(
    "experts, message",
    [([0, 0, 1, 2], "repeats"), ([0, 1, 2, 16], "outside"), ([0, 1, 2], "needs 4")],
)
def test_bad_expert_lists(float32_checkpoint, experts, message) -> None:
    with pytest.raises(ValueError, match=message):
        MiniMaxM2Model.from_pretrained(float32_checkpoint, experts=experts)
