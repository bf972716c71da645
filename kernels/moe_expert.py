"""SwiGLU expert MLP with a fused gate/up weight."""

import numpy as np

from kernels.matmul import matmul


def moe_expert(x: np.ndarray, w13: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """down(silu(gate(x)) * up(x)).

    x: [..., N, hidden], w13: [..., hidden, 2I] (gate = w1 columns first, then up = w3), w2: [..., I, hidden]
    -> [..., N, hidden]. Leading axes batch over experts.
    """
    inter = w2.shape[-2]
    h = matmul(x, w13)
    gate = h[..., :inter]
    up = h[..., inter:]
    return matmul(gate / (1 + np.exp(-gate)) * up, w2)
