"""What every evaluation shares: precision, data sharding across ranks, one gather, encoders.

Distributed evaluation: when ``paddle.distributed`` is initialised with more than one rank, each
rank takes the strided share ``rank, rank + world, ...`` of the samples, runs the model on it and
the per-sample results of all ranks are gathered *once* (``all_gather_object``) and put back in
dataset order, so every rank ends with the same, complete result. Functions that may gather say so;
every rank must call them, or the collective hangs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from ..models.inference_mode import inference_mode

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "all_gather",
    "atomic_write",
    "autocast",
    "encode_images",
    "encode_texts",
    "eval_mode",
    "gather_rows",
    "make_loader",
    "merge_shards",
    "shard_indices",
    "tokenize_numpy",
    "unwrap_model",
    "world_info",
]

PRECISIONS = ("fp32", "fp16", "bf16")
_AMP_DTYPE = {"fp16": "float16", "bf16": "bfloat16"}
_warned_cpu_amp = False


def atomic_write(path: Union[str, os.PathLike], write: Callable[[IO[bytes]], None]) -> Path:
    """Write via a temporary file in the same folder and rename, so readers (and other ranks or
    runs sharing a cache) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def world_info(distributed: Optional[bool] = None) -> Tuple[int, int]:
    """``(rank, world_size)``; ``distributed=None`` means 'use paddle.distributed if it is initialised'."""
    if distributed is False:
        return 0, 1
    initialised = paddle.distributed.is_initialized()
    if distributed and not initialised:
        raise RuntimeError(
            "distributed evaluation was requested but paddle.distributed is not initialised; call "
            "paddle.distributed.init_parallel_env() in every process (paddle.distributed.launch sets it up)"
        )
    if not initialised:
        return 0, 1
    return paddle.distributed.get_rank(), paddle.distributed.get_world_size()


def shard_indices(n: int, rank: int, world: int) -> np.ndarray:
    """Strided share of ``range(n)`` for ``rank``: balanced to within one sample, covering every index once."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world}")
    return np.arange(rank, n, world, dtype=np.int64)


def all_gather(obj: Any, world: int) -> List[Any]:
    """Every rank's ``obj`` (picklable), via one ``all_gather_object``; ``[obj]`` when not distributed."""
    if world == 1:
        return [obj]
    parts: List[Any] = []
    paddle.distributed.all_gather_object(parts, obj)
    return parts


def merge_shards(parts: Sequence[Tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Put ``(indices, rows)`` shards back in dataset order; they must cover ``range(n)`` exactly once."""
    all_idx = np.concatenate([np.asarray(idx, dtype=np.int64).reshape(-1) for idx, _ in parts])
    if all_idx.shape != (n,) or not np.array_equal(np.sort(all_idx), np.arange(n)):
        raise RuntimeError(f"gathered {all_idx.size} results that do not cover the {n} samples exactly once")
    for idx, rows in parts:
        if len(rows) != len(idx):
            raise ValueError(f"a shard has {len(rows)} rows for {len(idx)} indices")
    # Empty shards carry no row shape (a rank may get no samples), so leave them out.
    filled = [np.asarray(rows) for idx, rows in parts if len(idx)]
    if not filled:
        return np.asarray(parts[0][1])
    order = np.argsort(all_idx, kind="stable")
    return np.concatenate(filled)[order]


def gather_rows(local: Dict[str, np.ndarray], indices: np.ndarray, n: int, world: int) -> Dict[str, np.ndarray]:
    """Gather this rank's per-sample arrays (rows matching ``indices``) from all ranks in one
    collective; returns each key with ``n`` rows in dataset order."""
    parts = all_gather((indices, local), world)
    return {key: merge_shards([(idx, d[key]) for idx, d in parts], n) for key in local}


def autocast(precision: str) -> ContextManager:
    """``paddle.amp.auto_cast`` (O1) for 'fp16' / 'bf16'; a no-op for 'fp32'.

    Paddle only autocasts on accelerators; on CPU this logs once and evaluates in fp32 instead of
    letting Paddle warn on every batch.
    """
    global _warned_cpu_amp
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if paddle.get_device().startswith("cpu"):
        if not _warned_cpu_amp:
            logger.warning("%s autocast has no effect on CPU in Paddle; evaluating in fp32", precision)
            _warned_cpu_amp = True
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, dtype=_AMP_DTYPE[precision], level="O1")


def unwrap_model(model):
    """The CLIP model inside ``paddle.DataParallel`` / fleet wrappers."""
    while hasattr(model, "_layers"):
        model = model._layers
    return model


@contextlib.contextmanager
def eval_mode(model):
    """Evaluate with dropout off, inside :func:`paddlemix.inference_mode` (no gradients; packed
    weights on CPUs: evaluation loops over batches and never changes the weights), and give a
    training loop its model back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with inference_mode(model):
            yield model
    finally:
        if was_training:
            model.train()


def make_loader(dataset, indices: np.ndarray, batch_size: int, num_workers: int) -> paddle.io.DataLoader:
    """Ordered, non-dropping loader over ``indices`` of ``dataset``; workers decode while the model runs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    subset = paddle.io.Subset(dataset, indices.tolist())
    return paddle.io.DataLoader(
        subset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers, return_list=True
    )


def _features(x: paddle.Tensor, normalize: bool) -> np.ndarray:
    x = x.astype("float32")
    if normalize:
        x = F.normalize(x, axis=-1)
    return x.numpy()


def encode_images(
    model,
    dataset,
    indices: np.ndarray,
    *,
    batch_size: int,
    num_workers: int = 0,
    precision: str = "fp32",
    normalize: bool = True,
    progress: bool = True,
    desc: str = "images",
    on_batch: Optional[Callable[[np.ndarray, Any], None]] = None,
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Image features (float32) of ``dataset[indices]`` plus the per-batch second fields (labels / ids).

    ``on_batch(features, second)`` lets callers reduce each batch (e.g. to logits) instead of
    keeping features; then the returned feature array is empty.
    """
    model = unwrap_model(model)
    feats, seconds = [], []
    loader = make_loader(dataset, indices, batch_size, num_workers)
    with eval_mode(model):
        for images, second in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
            with autocast(precision):
                out = model.encode_image(images)
            f = _features(out, normalize)
            second = second.numpy() if isinstance(second, paddle.Tensor) else np.asarray(second)
            if on_batch is not None:
                on_batch(f, second)
            else:
                feats.append(f)
            seconds.append(second)
    features = np.concatenate(feats) if feats else np.zeros((0, 0), dtype=np.float32)
    return features, seconds


def tokenize_numpy(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """int64 token ids [N, L] from a paddlemix ``SimpleTokenizer`` or any callable returning ids."""
    if hasattr(tokenizer, "batch_encode"):
        return np.asarray(tokenizer.batch_encode(list(texts)), dtype=np.int64)
    ids = tokenizer(list(texts))
    ids = ids.numpy() if isinstance(ids, paddle.Tensor) else np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != len(texts):
        raise ValueError(f"tokenizer returned shape {ids.shape} for {len(texts)} texts; expected [N, context_length]")
    return ids.astype(np.int64)


def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int,
    precision: str = "fp32",
    normalize: bool = True,
    progress: bool = True,
    desc: str = "texts",
) -> np.ndarray:
    """Text features (float32, [len(texts), D]) in input order, tokenised batch by batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = unwrap_model(model)
    out = []
    with eval_mode(model):
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
            ids = paddle.to_tensor(tokenize_numpy(tokenizer, texts[start:start + batch_size]))
            with autocast(precision):
                f = model.encode_text(ids)
            out.append(_features(f, normalize))
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out)
