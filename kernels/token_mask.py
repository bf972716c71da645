"""A grammar's token mask applied to the logits on the device, before any choice is made.

A mask is a row of bits, bit j of 32-bit word w allowing token 32 w + j (the grammar engine's packed
int32 bitmask, little-endian bit order), over this rank's vocabulary slice. Only constrained rows carry
one: masks [M, words] hold them, and mask_index [N] names each row's (-1: the row is free). The bits are
unpacked with an AND against each bit's value (no shifts on the device).
"""

import numpy as np

FORBIDDEN = np.float32(-1e30)  # a forbidden token's logit: below any real one, finite at any temperature
BIT_VALUES = (np.uint32(1) << np.arange(32, dtype=np.uint32)).view(np.int32)  # 1, 2, 4, .., -2^31


def allowed_tokens(masks: np.ndarray, mask_index: np.ndarray, columns: int) -> np.ndarray:
    """masks [M, words] int32, mask_index [N] int32 (-1: free) -> [N, columns] bool: the tokens each row may
    choose (every token of a free row)."""
    words = np.take(masks, np.maximum(mask_index, 0), axis=0)  # [N, words]
    bits = (words[:, :, None] & BIT_VALUES[None, None, :]) != 0  # [N, words, 32]
    allowed = bits.reshape(words.shape[0], words.shape[1] * 32)[:, :columns]
    return allowed | (mask_index < 0)[:, None]


def mask_logits(logits: np.ndarray, masks: np.ndarray, mask_index: np.ndarray) -> np.ndarray:
    """logits [N, C] float32 -> the same with every token a row's mask forbids at FORBIDDEN (or below, where
    it was already: the vocabulary's padding)."""
    return np.where(allowed_tokens(masks, mask_index, logits.shape[-1]), logits, np.minimum(logits, FORBIDDEN))
