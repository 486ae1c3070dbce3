"""2-D rotary position embedding of the EVA02 vision towers.

Released EVA weights carry no RoPE tables, so they are computed here from the
config. Half of each head's channels rotate with the patch row, half with the
column; channel pairs ``(2i, 2i+1)`` rotate together. With ``intp_freq`` the
positions of a ``grid_size`` grid are rescaled onto the ``pt_seq_len`` grid the
model was pretrained on, which is how EVA02 runs at 336 or 448 px.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn

__all__ = ["RotaryEmbedding2D", "rotate_pairs"]


def rotate_pairs(x: paddle.Tensor) -> paddle.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis."""
    pairs = x.reshape(x.shape[:-1] + [x.shape[-1] // 2, 2])
    rotated = paddle.stack([-pairs[..., 1], pairs[..., 0]], axis=-1)
    return rotated.reshape(x.shape)


class RotaryEmbedding2D(nn.Layer):
    """Holds cos/sin tables ``[grid*grid, head_dim]`` (non-persistent buffers).

    Args:
        head_dim: channels per attention head; must be divisible by 4.
        grid_size: patches per side of the input grid.
        pt_seq_len: patches per side at pretraining (EVA's ``pt_hw_seq_len``).
        intp_freq: rescale positions so a ``grid_size`` grid spans ``pt_seq_len`` positions.
        theta: frequency base.
    """

    def __init__(self, head_dim: int, grid_size: int, pt_seq_len: int = 16, intp_freq: bool = False,
                 theta: float = 10000.0):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
        if not intp_freq and grid_size != pt_seq_len:
            raise ValueError(
                f"RoPE grid {grid_size} differs from pt_hw_seq_len {pt_seq_len}; set intp_freq=true to interpolate"
            )
        half = head_dim // 2
        freqs = 1.0 / theta ** (np.arange(0, half, 2, dtype=np.float32)[: half // 2] / half)
        pos = np.arange(grid_size, dtype=np.float32)
        if intp_freq:
            pos = pos / grid_size * pt_seq_len
        angles = np.repeat(np.outer(pos, freqs), 2, axis=-1)  # [grid, half], each frequency twice
        rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, half))
        cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, half))
        table = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, head_dim)
        self.grid_size = grid_size
        self.register_buffer("freqs_cos", paddle.to_tensor(np.cos(table).astype(np.float32)), persistable=False)
        self.register_buffer("freqs_sin", paddle.to_tensor(np.sin(table).astype(np.float32)), persistable=False)

    def rotate(self, x: paddle.Tensor, keep_index: Optional[paddle.Tensor] = None,
              num_prefix_tokens: int = 1) -> paddle.Tensor:
        """Rotate ``x`` [B, L, H, D] on its patch tokens (prefix tokens untouched).

        ``keep_index`` [B, K] are the patch positions kept by patch dropout, in token order.
        """
        prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
        cos, sin = self.freqs_cos, self.freqs_sin
        if keep_index is None:
            cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, D], broadcast over batch and heads
        else:
            cos = paddle.gather(cos, keep_index.reshape([-1])).reshape(keep_index.shape + [1, cos.shape[-1]])
            sin = paddle.gather(sin, keep_index.reshape([-1])).reshape(keep_index.shape + [1, sin.shape[-1]])
        pf = patches.astype("float32")
        rotated = (pf * cos + rotate_pairs(pf) * sin).astype(x.dtype)
        return paddle.concat([prefix, rotated], axis=1)
