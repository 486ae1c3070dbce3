"""Inputs both benchmark workers generate from the same seeds (numpy only: the peer never imports Paddle)."""
import numpy as np


def image_batch(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal([batch, 3, size, size]).astype(np.float32)


def text_batch(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Full-length random token ids ending in the EOT id (the largest), as a 77-token caption would."""
    ids = np.random.default_rng(seed).integers(1, vocab - 1, size=[batch, length]).astype(np.int64)
    ids[:, -1] = vocab - 1
    return ids


def matmul_operands(m: int, k: int, n: int) -> tuple:
    """[m, k] and [k, n] float32 operands."""
    rng = np.random.default_rng(0)
    return rng.standard_normal([m, k]).astype(np.float32), rng.standard_normal([k, n]).astype(np.float32)


def layer_norm_operands(rows: int, cols: int) -> tuple:
    """x, residual, dy, d(residual_out) [rows, cols] and weight, bias [cols] of a residual add + LayerNorm."""
    rng = np.random.default_rng(0)
    x, r, dy, ds = (rng.standard_normal([rows, cols]).astype(np.float32) for _ in range(4))
    w = rng.random(cols).astype(np.float32) + 0.5
    b = rng.standard_normal(cols).astype(np.float32)
    return x, r, dy, ds, w, b
