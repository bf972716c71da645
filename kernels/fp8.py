"""Blockwise FP8 weights dequantised inside a unit: float8_e4m3fn codes decoded exactly by integer arithmetic.

The checkpoint stores a weight as float8_e4m3fn bytes (1 sign bit, 4 exponent bits with bias 7, 3 mantissa
bits; no infinities; S.1111.111 is NaN; the largest finite value 448) and one float32 `weight_scale_inv` per
128 x 128 block; the real weight is float32(code) x scale. A NeuronCore's FP8 is the IEEE-style E4M3 (it
reads exponent 1111 as infinity or NaN) and nkipy's runtime has no float8_e4m3fn tensor, so the codes
travel as 8-bit integers and are decoded here with bit masks, selects and products of powers of two, each
step exact in float32:

    code = s eeee mmm      normal (eeee > 0): (8 + mmm) x 2^eeee x 2^-10 = (1 + mmm / 8) x 2^(eeee - 7)
                           subnormal (eeee = 0): mmm x 2 x 2^-10 = mmm / 8 x 2^-6

negated when s is set (so code 0x80 is -0.0) and NaN for the two codes x.1111.111.
"""

import numpy as np

_F32 = np.float32


def e4m3fn_values(codes: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns (uint8 or int8, any shape) -> their values, float32, exactly."""
    bits = codes.astype(np.int32) & np.int32(255)
    normal = (bits & np.int32(120)) > 0
    significand = (bits & np.int32(7)).astype(_F32) + np.where(normal, _F32(8), _F32(0))
    power = _F32(1)  # 2^eeee, one exponent bit at a time: bit 3 + k of the code is worth 2^(2^k)
    for k in range(4):
        power = power * np.where((bits & np.int32(8 << k)) > 0, _F32(2 ** (1 << k)), _F32(1))
    magnitude = significand * np.where(normal, power, _F32(2)) * _F32(2.0**-10)
    value = np.where((bits & np.int32(128)) > 0, -magnitude, magnitude)
    return np.where((bits & np.int32(127)) == 127, _F32(np.nan), value)


def dequantize(codes: np.ndarray, scales: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """codes [..., R, C] float8_e4m3fn bit patterns, scales [..., R / r, C / c] float32 (one per r x c block:
    the checkpoint's 128 x 128 blocks, or 1 x 128 / 128 x 1 where a rank's slice cuts through them) ->
    float32(code) x its block's scale [..., R, C], in `dtype`."""
    *lead, rows, cols = codes.shape
    row_blocks, col_blocks = scales.shape[-2:]
    blocked = e4m3fn_values(codes).reshape(*lead, row_blocks, rows // row_blocks, col_blocks, cols // col_blocks)
    return (blocked * scales[..., :, None, :, None]).reshape(*lead, rows, cols).astype(dtype)
