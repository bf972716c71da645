"""Pure NumPy kernels for MiniMax-M2, written inside the subset nkipy can trace.

Each kernel runs unchanged on CPU as NumPy and can be traced by nkipy for NeuronCores:
static shapes, no Python branching on tensor values, only the NumPy calls nkipy dispatches.
"""

from kernels.attention import attention
from kernels.embedding import token_embedding
from kernels.lm_head import gather_vocab, greedy_pick, greedy_vocab_parallel, lm_head, vocab_slice_logits
from kernels.logprobs import log_normaliser, logprobs_vocab_parallel
from kernels.moe_block import moe_block
from kernels.moe_expert import moe_expert
from kernels.moe_grouped import DENSE, DYNAMIC, expert_blocks, grouped_experts
from kernels.moe_parallel import moe_block_parallel, worst_case_capacity
from kernels.moe_router import moe_router
from kernels.rmsnorm import rmsnorm
from kernels.rope import rope_partial, rope_tables
from kernels.sampling import sample_candidates, sample_vocab_parallel, top_candidates

__all__ = [
    "DENSE",
    "DYNAMIC",
    "attention",
    "gather_vocab",
    "greedy_pick",
    "greedy_vocab_parallel",
    "expert_blocks",
    "grouped_experts",
    "lm_head",
    "log_normaliser",
    "logprobs_vocab_parallel",
    "vocab_slice_logits",
    "moe_block",
    "moe_block_parallel",
    "moe_expert",
    "moe_router",
    "rmsnorm",
    "rope_partial",
    "rope_tables",
    "sample_candidates",
    "sample_vocab_parallel",
    "token_embedding",
    "top_candidates",
    "worst_case_capacity",
]
