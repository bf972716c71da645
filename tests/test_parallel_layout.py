"""Layouts that cannot fit are refused before any weight is read; a layout run in threads matches."""

import shutil

import numpy as np
import pytest
from conftest import PROMPT
from hf_reference import relative_error
from thread_ranks import ThreadCollectives

import run_example
from kernels import collectives
from minimax_m2 import MiniMaxM2Config, MiniMaxM2Model
from minimax_m2.cli import main
from minimax_m2.parallel import ParallelLayout


@pytest.mark.parametrize("world, tp, rank, moe_tp, message", [
    (4, 3, 0, 1, "tp 3 must divide the number of ranks 4"),
    (2, 1, 2, 1, "rank 2 is outside 0..1"),
    (0, 1, 0, 1, "must be positive"),
    (4, 1, 0, 3, "moe_tp 3 must divide the number of ranks 4"),
    (12, 4, 0, 6, "moe_tp 6 and tp 4 must nest"),
])
def test_bad_layouts(world, tp, rank, moe_tp, message) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelLayout(world, tp, rank, moe_tp=moe_tp)


def test_union_leaves_out_padding_rows() -> None:
    """Batch 1 over four attention groups of one rank (each running two rows, a bucket of one row runs two),
    experts sliced over all 4: the union holds the real tokens only, padded to the bucket's size, which
    depends on the bucket alone."""
    valid = np.zeros((8, 3), bool)
    valid[2] = [True, True, False]  # group 1's first row: two real tokens
    (rows, member, real), size = ParallelLayout(4, 1, 2, moe_tp=4).union_tokens(1, valid)
    assert size == 3
    np.testing.assert_array_equal(rows, [6, 7, 0])
    np.testing.assert_array_equal(member, [1, 1, 0])
    np.testing.assert_array_equal(real, [True, True, False])
    (rows, _, real), size = ParallelLayout(4, 1, 2, moe_tp=2).union_tokens(1, valid[:, :1])
    assert size == 1 and rows.shape == (2,) and not real.any(), "slice group {2, 3} holds only padding"


def test_a_token_bound_caps_the_union() -> None:
    """Rows of 3 tokens, 4 of them real in all (a prefill chunk's budget): the union holds 4, not 2 rows x 3."""
    layout = ParallelLayout(4, 1, 2, moe_tp=4)
    valid = np.zeros((8, 3), bool)
    valid[2] = [True, True, False]
    valid[4] = [True, True, False]
    assert layout.union_tokens(2, valid)[1] == 6
    (rows, _, real), size = layout.union_tokens(2, valid, max_tokens=4)
    assert size == 4 and real.sum() == 4
    valid[6] = True
    with pytest.raises(ValueError, match="7 real tokens in a slice group exceed the step's bound of 4"):
        layout.union_tokens(3, valid, max_tokens=4)


def test_sliced_experts_must_divide_the_intermediate_size(float32_checkpoint) -> None:
    config = MiniMaxM2Config.from_pretrained(float32_checkpoint)
    with pytest.raises(ValueError, match="moe_tp 32 does not divide the expert intermediate size 48"):
        ParallelLayout(32, 1, 0, moe_tp=32).check(config, 16)


def test_layout_checked_before_weights_are_read(float32_checkpoint, tmp_path) -> None:
    """Only config.json is present: the layout error comes first."""
    shutil.copy(float32_checkpoint / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="16 loaded experts cannot be spread evenly over 3 rank groups"):
        MiniMaxM2Model.from_pretrained(tmp_path, layout=ParallelLayout(3, 1, 0))
    config = MiniMaxM2Config.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tp 4 does not divide the 2 KV heads"):
        ParallelLayout(4, 4, 0).check(config, 16)


def test_ep_without_torchrun_is_refused(capsys) -> None:
    with pytest.raises(ValueError, match="launch with torchrun --nproc-per-node 2"):
        main(run_example.parse_args(["--mode", "random", "--ep", "2"]))


@pytest.mark.parametrize("world, tp, moe_tp, batch", [(2, 2, 1, 2), (4, 2, 1, 2), (4, 1, 4, 1), (4, 1, 1, 1),
                                                      (4, 2, 2, 1)],
                         ids=["w2-tp2", "w4-tp2", "w4-sliced-batch1", "w4-spread-batch1", "w4-mixed-batch1"])
def test_threaded_ranks_match_one_process(float32_checkpoint, world, tp, moe_tp, batch) -> None:
    """Batch 1 over 4 attention groups leaves 3 groups of padding rows: they never reach an expert."""
    prompt = PROMPT[:batch]
    model = MiniMaxM2Model.from_pretrained(float32_checkpoint, max_seq_len=32)
    want_ids, want = model.generate(prompt, 4, return_logits=True)
    backend = ThreadCollectives(world)
    collectives.set_backend(backend)
    try:
        results = backend.run(lambda r: MiniMaxM2Model.from_pretrained(
            float32_checkpoint, max_seq_len=32, layout=ParallelLayout(world, tp, r, moe_tp=moe_tp)
        ).generate(prompt, 4, return_logits=True))
    finally:
        collectives.set_backend(None)
    for ids, logits in results:
        np.testing.assert_array_equal(ids, want_ids)
        assert relative_error(logits, want) < 1e-5


def test_nkipy_backend_says_what_it_needs() -> None:
    """nkipy is absent here (only a placeholder exists on PyPI): the backend refuses clearly."""
    try:
        import nkipy.distributed  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="Trainium"):
            collectives.NkipyCollectives()
    else:
        pytest.skip("nkipy is installed: this host can trace for Trainium")
