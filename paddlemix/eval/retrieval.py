"""Zero-shot image-text retrieval on Karpathy-split test sets (COCO 5k, Flickr30k 1k).

Images and captions are encoded on every rank's share, gathered once, and recall@k is computed on
the full similarity matrix (see ``metrics.retrieval_metrics`` for the definition and field names).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np

from .common import all_gather, encode_images, encode_texts, merge_shards, shard_indices, world_info
from .datasets import RetrievalDataset
from .metrics import RETRIEVAL_KS, retrieval_metrics

logger = logging.getLogger(__name__)

__all__ = ["evaluate_retrieval", "retrieval_features"]


def retrieval_features(
    model,
    tokenizer,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    distributed: Optional[bool] = None,
    progress: bool = True,
) -> Dict[str, np.ndarray]:
    """L2-normalised ``image_features`` and ``text_features`` of the whole set, in dataset order."""
    rank, world = world_info(distributed)
    n_img, n_txt = len(dataset), len(dataset.texts)
    img_idx = shard_indices(n_img, rank, world)
    txt_idx = shard_indices(n_txt, rank, world)
    img, _ = encode_images(model, dataset, img_idx, batch_size=batch_size, num_workers=num_workers,
                           precision=precision, normalize=True, progress=progress and rank == 0, desc="images")
    txt = encode_texts(model, tokenizer, [dataset.texts[i] for i in txt_idx], batch_size=batch_size,
                       precision=precision, normalize=True, progress=progress and rank == 0, desc="captions")
    parts = all_gather({"img": (img_idx, img), "txt": (txt_idx, txt)}, world)
    return {
        "image_features": merge_shards([p["img"] for p in parts], n_img),
        "text_features": merge_shards([p["txt"] for p in parts], n_txt),
    }


def evaluate_retrieval(
    model,
    tokenizer,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    distributed: Optional[bool] = None,
    progress: bool = True,
    ks: Sequence[int] = RETRIEVAL_KS,
) -> Dict[str, float]:
    """``image_retrieval_recall@k`` (text->image) and ``text_retrieval_recall@k`` (image->text)."""
    feats = retrieval_features(model, tokenizer, dataset, batch_size=batch_size, num_workers=num_workers,
                               precision=precision, distributed=distributed, progress=progress)
    metrics: Dict[str, float] = retrieval_metrics(feats["image_features"], feats["text_features"], dataset.text_to_image, ks)
    metrics["num_images"] = len(dataset)
    metrics["num_texts"] = len(dataset.texts)
    return metrics
