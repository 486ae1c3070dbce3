"""Zero-shot metrics with one explicit ranking rule, in numpy.

Published CLIP numbers are computed with ``torch.topk``, whose order among equal scores is
unspecified, so a degenerate model (e.g. fp16 overflow collapsing every logit to the same value)
can score by luck of the sort. Here a rank is defined without sorting:

    rank(target) = number of *other* candidates whose score is >= the target's score

and the target is "in the top k" when ``rank < k``. Ties therefore count against the model: a
class that ties with another for first place is not a top-1 hit. Rows containing NaN never count
as hits. With distinct scores this is exactly the usual top-k, so results on real models are
unchanged; only ties differ, and they differ towards the pessimistic side.

Retrieval (several positives per query, e.g. 5 captions per image) uses the same rule on the best
positive: a query is found at k when fewer than k *negatives* score >= its best positive. Other
positives never push a positive out of the top k.

Field names follow CLIP_benchmark: accuracies are fractions in [0, 1], ``acc5`` is ``None`` for
datasets with fewer than 5 classes (CLIP_benchmark reports NaN there), and
``mean_per_class_recall`` averages the recall of the classes that occur in the labels (sklearn's
``balanced_accuracy_score``).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import scipy.stats

from .._util import l2_normalize

logger = logging.getLogger(__name__)

__all__ = [
    "RETRIEVAL_KS",
    "classification_metrics",
    "mean_per_class_recall",
    "pearson",
    "rankdata",
    "recall_at_k",
    "retrieval_metrics",
    "spearman",
    "summarize_classification",
    "top_k_accuracy",
    "topk_correct",
]

RETRIEVAL_KS: Tuple[int, ...] = (1, 5, 10)

# Elements of a [rows, candidates] block processed at once (~64 MB of float32), so a COCO-sized
# image -> 25k captions comparison never materialises the full boolean matrices.
_BLOCK_ELEMENTS = 1 << 24


def _chunks(n: int, width: int) -> Iterator[slice]:
    size = max(1, _BLOCK_ELEMENTS // max(width, 1))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    return int(k)


def _as_logits_and_labels(logits, labels) -> Tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [num_samples, num_classes], got shape {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape [{logits.shape[0]}] to match logits {logits.shape}, got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}) for {logits.shape[1]} classes; "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    return logits, labels


def topk_correct(logits, labels, ks: Sequence[int] = (1, 5)) -> Dict[int, np.ndarray]:
    """Per-sample hit masks ``{k: bool [N]}`` under the tie-pessimistic rule of this module."""
    logits, labels = _as_logits_and_labels(logits, labels)
    ks = [_check_k(k) for k in ks]
    n = logits.shape[0]
    out = {k: np.zeros(n, dtype=bool) for k in ks}
    nan_rows = 0
    for sl in _chunks(n, logits.shape[1]):
        block = logits[sl]
        target = block[np.arange(block.shape[0]), labels[sl]]
        # Self always satisfies >= (NaN rows are excluded below), so subtract it.
        rank = (block >= target[:, None]).sum(axis=1) - 1
        valid = ~np.isnan(block).any(axis=1)
        nan_rows += int((~valid).sum())
        for k in ks:
            out[k][sl] = valid & (rank < k)
    if nan_rows:
        logger.warning("%d of %d rows of logits contain NaN; they count as misses", nan_rows, n)
    return out


def top_k_accuracy(logits, labels, k: int = 1) -> float:
    """Fraction of samples whose label is in the top ``k`` (ties count against; k >= classes gives 1)."""
    hits = topk_correct(logits, labels, ks=(k,))[k]
    if hits.size == 0:
        raise ValueError("top_k_accuracy of an empty set is undefined")
    return float(hits.mean())


def _per_class_recall(hits: np.ndarray, labels: np.ndarray) -> float:
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if classes.size == 0:
        raise ValueError("mean_per_class_recall of an empty set is undefined")
    per_class = np.bincount(inverse, weights=hits.astype(np.float64), minlength=classes.size) / counts
    return float(per_class.mean())


def mean_per_class_recall(logits, labels) -> float:
    """Average over the classes present in ``labels`` of the fraction of their samples ranked first."""
    logits, labels = _as_logits_and_labels(logits, labels)
    return _per_class_recall(topk_correct(logits, labels, ks=(1,))[1], labels)


def summarize_classification(
    correct1: np.ndarray, correct5: Optional[np.ndarray], labels: np.ndarray, num_classes: int
) -> Dict[str, Optional[float]]:
    """Metrics from per-sample hit masks; lets ranks ship booleans instead of logits."""
    correct1 = np.asarray(correct1, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    if correct1.size == 0:
        raise ValueError("no samples were evaluated; the dataset (or this rank's share of it) is empty")
    acc5 = None
    if num_classes >= 5:
        if correct5 is None:
            raise ValueError(f"correct5 is required for {num_classes} >= 5 classes")
        acc5 = float(np.asarray(correct5, dtype=bool).mean())
    return {
        "acc1": float(correct1.mean()),
        "acc5": acc5,
        "mean_per_class_recall": _per_class_recall(correct1, labels),
    }


def classification_metrics(logits, labels) -> Dict[str, Optional[float]]:
    """``{"acc1", "acc5", "mean_per_class_recall"}`` as CLIP_benchmark names them (acc5 None below 5 classes)."""
    logits, labels = _as_logits_and_labels(logits, labels)
    num_classes = logits.shape[1]
    ks = (1, 5) if num_classes >= 5 else (1,)
    hits = topk_correct(logits, labels, ks=ks)
    return summarize_classification(hits[1], hits.get(5), labels, num_classes)


def recall_at_k(scores, positives, ks: Sequence[int] = RETRIEVAL_KS) -> Dict[int, np.ndarray]:
    """Per-query found masks ``{k: bool [Q]}``: fewer than k negatives score >= the best positive.

    ``scores`` is [Q, G] (query x gallery); ``positives`` a bool [Q, G] mask with at least one
    positive per query. ``k`` may exceed the gallery size (then every query is found).
    """
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=bool)
    if scores.ndim != 2 or positives.shape != scores.shape:
        raise ValueError(f"scores and positives must both be [queries, gallery]; got {scores.shape} and {positives.shape}")
    ks = [_check_k(k) for k in ks]
    n_pos = positives.sum(axis=1)
    if (n_pos == 0).any():
        raise ValueError(f"{int((n_pos == 0).sum())} queries have no positive in the gallery; recall is undefined for them")
    out = {k: np.zeros(scores.shape[0], dtype=bool) for k in ks}
    nan_rows = 0
    for sl in _chunks(scores.shape[0], scores.shape[1]):
        out_block = _found_block(scores[sl], positives[sl], ks)
        for k in ks:
            out[k][sl] = out_block[k]
        nan_rows += int(np.isnan(scores[sl]).any(axis=1).sum())
    if nan_rows:
        logger.warning("%d of %d queries have NaN scores; they count as not found", nan_rows, scores.shape[0])
    return out


def _found_block(block: np.ndarray, pos: np.ndarray, ks: Sequence[int]) -> Dict[int, np.ndarray]:
    best = np.where(pos, block, -np.inf).max(axis=1)
    beaten_by = ((block >= best[:, None]) & ~pos).sum(axis=1)
    valid = ~np.isnan(block).any(axis=1)
    return {k: valid & (beaten_by < k) for k in ks}


def retrieval_metrics(
    image_features, text_features, text_to_image, ks: Sequence[int] = RETRIEVAL_KS
) -> Dict[str, float]:
    """Image/text retrieval recall@k by cosine similarity, with CLIP_benchmark's field names.

    ``text_to_image[t]`` is the index of the image that caption ``t`` describes. As in
    CLIP_benchmark, ``image_retrieval_recall@k`` is text -> image (each caption is a query) and
    ``text_retrieval_recall@k`` is image -> text (each image is a query; any of its captions counts).
    """
    img = l2_normalize(np.asarray(image_features, dtype=np.float32))
    txt = l2_normalize(np.asarray(text_features, dtype=np.float32))
    t2i = np.asarray(text_to_image, dtype=np.int64)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D; got images {img.shape}, texts {txt.shape}")
    if t2i.shape != (txt.shape[0],):
        raise ValueError(f"text_to_image must have one entry per text ({txt.shape[0]}), got shape {t2i.shape}")
    if t2i.size and (t2i.min() < 0 or t2i.max() >= img.shape[0]):
        raise ValueError(f"text_to_image indices must lie in [0, {img.shape[0]}), got [{t2i.min()}, {t2i.max()}]")
    ks = [_check_k(k) for k in ks]
    image_ids = np.arange(img.shape[0])

    text_found = {k: [] for k in ks}
    for sl in _chunks(txt.shape[0], img.shape[0]):
        pos = t2i[sl, None] == image_ids[None, :]
        for k, found in recall_at_k(txt[sl] @ img.T, pos, ks).items():
            text_found[k].append(found)
    image_found = {k: [] for k in ks}
    for sl in _chunks(img.shape[0], txt.shape[0]):
        pos = image_ids[sl, None] == t2i[None, :]
        for k, found in recall_at_k(img[sl] @ txt.T, pos, ks).items():
            image_found[k].append(found)

    metrics: Dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float(np.concatenate(text_found[k]).mean())
        metrics[f"text_retrieval_recall@{k}"] = float(np.concatenate(image_found[k]).mean())
    return metrics


def rankdata(x) -> np.ndarray:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata``); NaN is refused."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if np.isnan(x).any():
        raise ValueError(f"cannot rank data containing NaN ({int(np.isnan(x).sum())} values)")
    return scipy.stats.rankdata(x, method="average")


def pearson(x, y) -> float:
    """Pearson correlation; NaN (with a warning) when either input is constant."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two equally long sequences of at least 2 values, got {x.size} and {y.size}")
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    if denom == 0:
        logger.warning("correlation is undefined for a constant input; returning NaN")
        return float("nan")
    return float(np.clip((xc * yc).sum() / denom, -1.0, 1.0))


def spearman(x, y) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``; ties get average ranks).

    Inputs are checked as in :func:`pearson` and :func:`rankdata`: NaN is refused, and a constant
    input gives NaN with a logged warning.
    """
    x, y = rankdata(x), rankdata(y)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two equally long sequences of at least 2 values, got {x.size} and {y.size}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        logger.warning("correlation is undefined for a constant input; returning NaN")
        return float("nan")
    return float(scipy.stats.spearmanr(x, y).statistic)
