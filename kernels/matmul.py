"""Matrix product in the operands' dtype."""

import numpy as np


def matmul(a: np.ndarray, b: np.ndarray, rows_apart: bool = False) -> np.ndarray:
    """a @ b with the result in the operands' common dtype: bf16 x bf16 -> bf16, as a NeuronCore's matmul
    returns it (ml_dtypes' CPU matmul would give float32 and silently promote everything after it).

    Rows of a stacked `a` ([..., n, k]) against a weight `b` ([k, m]) are one matrix product over all
    rows ([rows, k] @ [k, m]): NumPy would otherwise multiply each leading slice separately, reading the
    weight once per slice. rows_apart (a trace-time schedule): each of those rows multiplied on its own, as
    is cheaper on a CPU for a few rows (its BLAS streams the weight for one row, but packs it first for two
    or more); a NeuronCore multiplies them together."""
    if a.ndim > 2 and b.ndim == 2:
        return matmul(a.reshape(-1, a.shape[-1]), b, rows_apart).reshape(*a.shape[:-1], b.shape[-1])
    if rows_apart and a.shape[0] > 1:
        return np.concatenate([matmul(a[i : i + 1], b) for i in range(a.shape[0])])
    return cast(a @ b, np.result_type(a.dtype, b.dtype))


def cast(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """a in `dtype`, not copied when it already is (a traced astype takes no copy argument)."""
    return a if a.dtype == dtype else a.astype(dtype)
