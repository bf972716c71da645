"""MiniMax-M2 (MiniMaxM2ForCausalLM) assembled from the NumPy kernels in `kernels/`."""

from minimax_m2.config import MiniMaxM2Config
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.weights.checkpoint import CheckpointError

__all__ = ["CheckpointError", "MiniMaxM2Config", "MiniMaxM2Model"]
