"""SwiGLU expert MLP with a fused gate/up weight."""

import numpy as np

from kernels.matmul import matmul


def moe_expert(x: np.ndarray, w13: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """down(silu(gate(x)) * up(x)), with the weights in their checkpoint layout [out, in].

    x: [..., N, hidden], w13: [..., 2I, hidden] (gate = w1 rows first, then up = w3), w2: [..., hidden, I]
    -> [..., N, hidden]. Leading axes batch over experts. Computed on the transposed rows, h^T = W x^T,
    so that the weight is the left operand: on a CPU that multiplies a few rows by a large weight faster.
    """
    inter = w2.shape[-1]
    h = matmul(w13, np.swapaxes(x, -1, -2))  # [..., 2I, N]
    gate = h[..., :inter, :]
    up = h[..., inter:, :]
    return np.swapaxes(matmul(w2, gate / (1 + np.exp(-gate)) * up), -1, -2)
