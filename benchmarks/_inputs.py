"""Inputs both benchmark workers generate from the same seeds (numpy only: the peer never imports Paddle)."""
import numpy as np


def image_batch(batch: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal([batch, 3, size, size]).astype(np.float32)


def text_batch(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """Full-length random token ids ending in the EOT id (the largest), as a 77-token caption would."""
    ids = np.random.default_rng(seed).integers(1, vocab - 1, size=[batch, length]).astype(np.int64)
    ids[:, -1] = vocab - 1
    return ids
