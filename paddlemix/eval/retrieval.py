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

__all__ = ["evaluate_retrieval", "retrieval_features", "retrieval_rankings"]


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
    features: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, float]:
    """``image_retrieval_recall@k`` (text->image) and ``text_retrieval_recall@k`` (image->text).

    ``features``: the output of ``retrieval_features`` for this model and dataset, when the caller
    already has it (e.g. to rank the gallery for a report as well); the model is then not run.
    """
    feats = features
    if feats is None:
        feats = retrieval_features(model, tokenizer, dataset, batch_size=batch_size, num_workers=num_workers,
                                   precision=precision, distributed=distributed, progress=progress)
    metrics: Dict[str, float] = retrieval_metrics(feats["image_features"], feats["text_features"], dataset.text_to_image, ks)
    metrics["num_images"] = len(dataset)
    metrics["num_texts"] = len(dataset.texts)
    return metrics


def _ranked(queries: np.ndarray, gallery: np.ndarray, positives, k: int, chunk: int):
    """Top-k gallery indices/scores per query and the 0-based rank of its best positive.

    Ranks follow ``metrics.recall_at_k``: the number of negatives scoring at least the best
    positive, so ``rank < k`` exactly when the query counts as found at k.
    """
    n = queries.shape[0]
    k = min(k, gallery.shape[0])
    top = np.zeros((n, k), np.int64)
    scores = np.zeros((n, k), np.float32)
    ranks = np.zeros(n, np.int64)
    for start in range(0, n, chunk):
        sim = queries[start:start + chunk] @ gallery.T
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        top[start:start + chunk] = order
        scores[start:start + chunk] = np.take_along_axis(sim, order, axis=1)
        pos = positives(start, sim.shape[0], gallery.shape[0])
        best = np.where(pos, sim, -np.inf).max(axis=1)
        ranks[start:start + chunk] = ((sim >= best[:, None]) & ~pos).sum(axis=1)
    return top, scores, ranks


def retrieval_rankings(image_features: np.ndarray, text_features: np.ndarray, text_to_image,
                       k: int = 10, chunk: int = 1024) -> Dict[str, np.ndarray]:
    """What a retrieval report shows: per caption the top-``k`` images, per image the top-``k`` captions.

    Returns ``t2i_topk`` / ``t2i_scores`` [texts, k], ``t2i_rank`` (rank of the described image),
    ``i2t_topk`` / ``i2t_scores`` [images, k] and ``i2t_rank`` (rank of the image's best caption);
    cosine similarities, ties broken by index.
    """
    img = np.asarray(image_features, np.float32)
    txt = np.asarray(text_features, np.float32)
    t2i = np.asarray(text_to_image, np.int64)

    def text_positives(start, rows, n_gallery):
        return t2i[start:start + rows, None] == np.arange(n_gallery)[None, :]

    def image_positives(start, rows, n_gallery):
        return np.arange(start, start + rows)[:, None] == t2i[None, :]

    out = {}
    out["t2i_topk"], out["t2i_scores"], out["t2i_rank"] = _ranked(txt, img, text_positives, k, chunk)
    out["i2t_topk"], out["i2t_scores"], out["i2t_rank"] = _ranked(img, txt, image_positives, k, chunk)
    return out
