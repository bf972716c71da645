"""Partial rotary position embedding (rotate-half on the first rotary_dim of each head)."""

import numpy as np


def rope_tables(max_positions: int, rotary_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables [max_positions, rotary_dim] float32; trace-time constants built from config numbers."""
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_partial(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first R = cos.shape[-1] features of every head; the rest passes through.

    x: [..., heads, head_dim], cos/sin: [..., R] (table rows at each token's position, the same leading
    axes as x) -> x's shape. x_rot * cos + rotate_half(x_rot) * sin, with rotate_half([a, b]) = [-b, a].
    """
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    cos = np.expand_dims(cos, -2)
    sin = np.expand_dims(sin, -2)
    x_rot = x[..., :rotary_dim]
    rotated = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return np.concatenate([x_rot * cos + rotated * sin, x[..., rotary_dim:]], axis=-1)
