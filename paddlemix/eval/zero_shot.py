"""Zero-shot image classification: the prompt-ensemble classifier and its evaluation.

The classifier follows CLIP / open_clip / PaddleMIX exactly, because published numbers depend on
it: for each class every template is filled in and encoded, each embedding is L2-normalised, the
embeddings are averaged and the mean is normalised again. Logits are ``100 * image @ W`` with
L2-normalised image features (the fixed 100, not the model's learned scale, as the references do;
it does not change rankings).

The classifier is rebuilt from the model being evaluated on every call. It may be cached on disk
(``cache_dir``): the file name is a sha256 over the text tower's weights, the exact token ids of
every prompt (so class names, templates, tokenizer and context length), and the precision, so a
cache entry can never be served for different weights or prompts.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import paddle

from .common import (
    all_gather,
    atomic_write,
    encode_images,
    encode_texts,
    gather_rows,
    shard_indices,
    tokenize_numpy,
    unwrap_model,
    world_info,
)
from .datasets import format_template, validate_templates
from .metrics import summarize_classification, topk_correct

logger = logging.getLogger(__name__)

__all__ = [
    "LOGIT_SCALE",
    "build_zero_shot_classifier",
    "check_cache_dir",
    "classifier_cache_key",
    "evaluate_zero_shot",
    "load_text_model",
    "zero_shot_predictions",
]

LOGIT_SCALE = 100.0
_CACHE_VERSION = b"paddlemix-zero-shot-classifier-v1"


def _prompts(classnames: Sequence[str], templates: Sequence[str]) -> List[str]:
    return [format_template(t, c) for c in classnames for t in templates]


def _hash_layer(h, layer: paddle.nn.Layer) -> None:
    for name, tensor in sorted(layer.state_dict().items()):
        value = np.ascontiguousarray(tensor.astype("float32").numpy() if tensor.dtype == paddle.bfloat16 else tensor.numpy())
        h.update(f"{name}|{value.dtype.str}|{value.shape}\n".encode())
        h.update(value.tobytes())


def classifier_cache_key(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], precision: str = "fp32") -> str:
    """sha256 hex digest identifying the classifier ``model`` would build for these prompts."""
    model = unwrap_model(model)
    h = hashlib.sha256(_CACHE_VERSION)
    h.update(f"precision={precision}\n".encode())
    # Only the text tower shapes the classifier; hashing it (not the image tower) keeps this cheap.
    _hash_layer(h, getattr(model, "text", model))
    for part in (classnames, templates):
        h.update(("\x1f".join(part) + "\x1e").encode("utf-8"))
    ids = tokenize_numpy(tokenizer, _prompts(classnames, templates))
    h.update(f"{ids.shape}".encode())
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def check_cache_dir(cache_dir: Union[str, os.PathLike], dataset_root: Union[str, os.PathLike]) -> Path:
    """Refuse a cache inside the dataset: datasets are shared and often read-only, and a stale file
    there would be picked up by other runs (PaddleMIX wrote its classifier next to labels.txt)."""
    cache = Path(cache_dir).resolve()
    data = Path(dataset_root).resolve()
    if cache == data or data in cache.parents:
        raise ValueError(
            f"classifier cache dir {cache} is inside the dataset {data}; put it under the output directory instead"
        )
    return cache


def _load_cached(path: Path, num_classes: int) -> Optional[np.ndarray]:
    try:
        w = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable classifier cache %s (%s); rebuilding", path, e)
        return None
    if w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != num_classes or not np.isfinite(w).all():
        logger.warning("ignoring malformed classifier cache %s (%s %s); rebuilding", path, w.dtype, w.shape)
        return None
    return w


def build_zero_shot_classifier(
    model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    distributed: Optional[bool] = None,
    progress: bool = True,
) -> paddle.Tensor:
    """The zero-shot weights ``W`` [embed_dim, num_classes] (float32); logits are ``100 * img @ W``.

    ``tokenizer`` maps a list of strings to int ids [N, L] (a paddlemix ``SimpleTokenizer`` or any
    callable). Classes are split across ranks when distributed (every rank must call this).
    """
    classnames = [str(c) for c in classnames]
    templates = validate_templates(templates)
    if not classnames:
        raise ValueError("no class names given")
    rank, world = world_info(distributed)
    cache_file = None
    if cache_dir is not None:
        key = classifier_cache_key(model, tokenizer, classnames, templates, precision)
        cache_file = Path(cache_dir) / f"zero_shot_classifier_{key}.npy"
        cached = _load_cached(cache_file, len(classnames)) if cache_file.is_file() else None
        # Ranks must agree, or those that miss would wait forever in the gather below (e.g. nodes
        # without a shared file system, or a file appearing between two ranks' checks).
        if all(all_gather(cached is not None, world)):
            logger.info("loaded zero-shot classifier from %s", cache_file)
            return paddle.to_tensor(cached)

    mine = shard_indices(len(classnames), rank, world)
    n_t = len(templates)
    texts = _prompts([classnames[i] for i in mine], templates)
    emb = encode_texts(model, tokenizer, texts, batch_size=batch_size, precision=precision, normalize=True,
                       progress=progress and rank == 0, desc="classifier")
    if len(mine):
        emb = emb.reshape(len(mine), n_t, -1).mean(axis=1)
        emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), np.float32(1e-12))
    weights = gather_rows({"w": emb.astype(np.float32)}, mine, len(classnames), world)["w"].T
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if cache_file is not None and rank == 0:
        atomic_write(cache_file, lambda f: np.save(f, weights))
        logger.info("saved zero-shot classifier to %s", cache_file)
    return paddle.to_tensor(weights)


def zero_shot_predictions(
    model,
    classifier,
    dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    distributed: Optional[bool] = None,
    progress: bool = True,
    topk: int = 5,
) -> Dict[str, np.ndarray]:
    """Per-sample results over ``dataset`` (items ``(image, label)``), in dataset order.

    Returns ``labels``, ``topk`` (class indices by descending logit, ties by class index) and the
    hit masks ``correct@1`` / ``correct@5`` under the tie-pessimistic rule of ``metrics``.
    Gathers once across ranks when distributed (every rank must call this).
    """
    weights = classifier.numpy() if isinstance(classifier, paddle.Tensor) else np.asarray(classifier)
    weights = weights.astype(np.float32)
    num_classes = weights.shape[1]
    k_out = min(topk, num_classes)
    rank, world = world_info(distributed)
    mine = shard_indices(len(dataset), rank, world)
    if world > 1:
        logger.info("rank %d of %d evaluates %d of %d images", rank, world, len(mine), len(dataset))
    rows: Dict[str, List[np.ndarray]] = {"labels": [], "topk": [], "correct@1": [], "correct@5": []}

    def on_batch(features: np.ndarray, labels: np.ndarray) -> None:
        logits = LOGIT_SCALE * (features @ weights)
        labels = labels.astype(np.int64).reshape(-1)
        hits = topk_correct(logits, labels, ks=(1, 5))
        rows["labels"].append(labels)
        rows["topk"].append(np.argsort(-logits, axis=1, kind="stable")[:, :k_out])
        rows["correct@1"].append(hits[1])
        rows["correct@5"].append(hits[5])

    encode_images(model, dataset, mine, batch_size=batch_size, num_workers=num_workers, precision=precision,
                  normalize=True, progress=progress and rank == 0, desc="zero-shot", on_batch=on_batch)
    local = {
        "labels": np.concatenate(rows["labels"]) if rows["labels"] else np.zeros(0, np.int64),
        "topk": np.concatenate(rows["topk"]) if rows["topk"] else np.zeros((0, k_out), np.int64),
        "correct@1": np.concatenate(rows["correct@1"]) if rows["correct@1"] else np.zeros(0, bool),
        "correct@5": np.concatenate(rows["correct@5"]) if rows["correct@5"] else np.zeros(0, bool),
    }
    return gather_rows(local, mine, len(dataset), world)


def evaluate_zero_shot(
    model,
    tokenizer,
    dataset,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "fp32",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    distributed: Optional[bool] = None,
    progress: bool = True,
    classifier: Optional[Any] = None,
    return_predictions: bool = False,
):
    """Build the classifier (unless given) and return CLIP_benchmark's metrics plus sample/class counts.

    With ``return_predictions`` the result is ``(metrics, predictions)``, the latter as
    ``zero_shot_predictions`` returns it (what a report needs to draw per-class plots).
    """
    if classifier is None:
        classifier = build_zero_shot_classifier(
            model, tokenizer, classnames, templates, batch_size=max(batch_size, 1) * 4, precision=precision,
            cache_dir=cache_dir, distributed=distributed, progress=progress,
        )
    if int(classifier.shape[1]) != len(classnames):
        raise ValueError(f"classifier has {classifier.shape[1]} classes but {len(classnames)} class names were given")
    pred = zero_shot_predictions(model, classifier, dataset, batch_size=batch_size, num_workers=num_workers,
                                 precision=precision, distributed=distributed, progress=progress)
    metrics: Dict[str, Any] = summarize_classification(pred["correct@1"], pred["correct@5"], pred["labels"], len(classnames))
    metrics["num_samples"] = int(len(pred["labels"]))
    metrics["num_classes"] = len(classnames)
    return (metrics, pred) if return_predictions else metrics


def load_text_model(name: str, image_model, precision: str = "fp32"):
    """``(model, tokenizer)`` whose text tower builds the zero-shot classifier: PaddleMIX's ``--pretrained_text_model``.

    PaddleMIX documents the flag as the model the class text features are extracted with; the
    image features still come from the model being evaluated, so both must share the embedding
    width. Loaded once by the caller; only its text tower is used.
    """
    from ..factory import create_model, get_tokenizer

    text_model = create_model(name, precision=precision)
    text_model.eval()
    for p in text_model.parameters():
        p.stop_gradient = True
    ours, theirs = image_model.config.embed_dim, text_model.config.embed_dim
    if ours != theirs:
        raise ValueError(
            f"--pretrained_text_model {name!r} embeds text in {theirs} dimensions but the evaluated model's image "
            f"features have {ours}; name a text model trained with this image tower's embedding width"
        )
    logger.info("zero-shot classifier text features come from %s", name)
    return text_model, get_tokenizer(text_model)
