"""Matrix product in the operands' dtype."""

import numpy as np


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b with the result in the operands' common dtype: bf16 x bf16 -> bf16, as a NeuronCore's matmul
    returns it (ml_dtypes' CPU matmul would give float32 and silently promote everything after it)."""
    return (a @ b).astype(np.result_type(a.dtype, b.dtype))
