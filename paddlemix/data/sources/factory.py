"""``build_train_dataset``: one ``--task_name`` string -> the right training-data source."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from paddlemix.data.sources.common import DEFAULT_MAX_PIXELS, expand_shard_pattern
from paddlemix.data.sources.mapstyle import CaptionFileDataset, CaptionListDataset, CocoKarpathyDataset
from paddlemix.data.sources.streaming import LaionFilelistDataset, StreamingCaptionDataset, WebDatasetTarDataset

__all__ = ["TASK_NAME_HELP", "build_train_dataset", "resolve_coco_karpathy"]

_logger = logging.getLogger(__name__)

TASK_NAME_HELP = (
    "'demo' (built-in synthetic data), 'coco_karpathy' (data_root, or PaddleMIX's coco.tar downloaded into "
    "$PADDLEMIX_HOME/datasets once), a COCO Karpathy '.json', a "
    "'.jsonl' / '.csv' / '.tsv' of image paths and captions, a PaddleMIX LAION filelist "
    "('.txt' / '.filelist' / '.gz'), or a webdataset shard pattern ('/data/{00000..00099}.tar')"
)

_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def resolve_coco_karpathy(data_root: str, image_root: Optional[str] = None):
    """(annotation file, image root) of a COCO folder in the LAVIS/PaddleMIX layout.

    Looks for ``annotations/coco_karpathy_train.json`` then ``coco_karpathy_train.json`` under
    ``data_root``; the Karpathy image paths (``train2014/...``) are relative to ``data_root/images``
    when that folder exists, else to ``data_root``.
    """
    candidates = [
        os.path.join(data_root, "annotations", "coco_karpathy_train.json"),
        os.path.join(data_root, "coco_karpathy_train.json"),
    ]
    annotation = next((c for c in candidates if os.path.isfile(c)), None)
    if annotation is None:
        raise FileNotFoundError(
            f"task_name='coco_karpathy' found no annotation file; looked for {candidates}. Point data_root at "
            f"the COCO folder, or pass the .json path itself as task_name."
        )
    if image_root is None:
        images = os.path.join(data_root, "images")
        image_root = images if os.path.isdir(images) else data_root
    return annotation, image_root


def build_train_dataset(
        task_name: str,
        transform: Callable[[Any], np.ndarray],
        tokenizer: Any,
        data_root: Optional[str] = None,
        image_root: Optional[str] = None,
        context_length: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        image_key: Optional[str] = None,
        caption_key: Optional[str] = None,
        separator: Optional[str] = None,
        shuffle_buffer: int = 1000,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_skip_fraction: float = 0.1,
        min_seen: int = 1000,
        return_caption: bool = False,
        demo_options: Optional[Dict[str, Any]] = None,
) -> Union[CaptionListDataset, StreamingCaptionDataset]:
    """The training set named by ``task_name`` (see ``TASK_NAME_HELP``).

    Map-style results (demo, COCO, JSONL/CSV) are ``paddle.io.Dataset`` s: shard them with a
    distributed batch sampler; ``rank``/``world_size`` are not used. Streaming results (LAION,
    webdataset) are ``paddle.io.IterableDataset`` s that already split their parts over
    ``world_size`` ranks x loader workers, so give each rank its data-parallel x sharding rank and
    do not shard them again. Both have ``set_epoch(epoch)`` and a ``skips`` counter.

    Args:
        task_name: which data (see ``TASK_NAME_HELP``).
        transform: PIL image -> float32 CHW array (``image_transform(..., output='numpy')``).
        tokenizer: has ``batch_encode(texts, context_length)``.
        data_root: 'coco_karpathy': the COCO folder (default: PaddleMIX's archive, downloaded into
            ``paddlemix.data.coco.default_datasets_dir()`` once); 'demo': where to generate the demo data
            (default ``paddlemix.data.demo.demo_cache_dir()``).
        image_root: folder of relative image paths (COCO JSON, JSONL/CSV); default the annotation
            file's folder.
        context_length: token length; None uses the tokenizer's.
        rank, world_size: data-parallel x sharding rank and size (streaming sources only).
        seed: shuffling and augmentation seed (epoch ``e`` uses ``seed`` and ``e``).
        image_key, caption_key, separator: JSONL/CSV columns and delimiter; caption_key is also the
            caption field of webdataset ``.json`` members (default 'caption').
        shuffle_buffer: records per reader held for shuffling (streaming sources).
        max_pixels: decompression-bomb guard.
        max_skip_fraction, min_seen: stop once more than this fraction of at least ``min_seen``
            samples were bad.
        return_caption: also return the caption string (debugging).
        demo_options: keyword arguments of ``make_demo_dataset`` (num_train, image_size, ...).
    """
    if not isinstance(task_name, str) or not task_name.strip():
        raise ValueError(f"task_name={task_name!r} must name the training data: {TASK_NAME_HELP}.")
    task_name = task_name.strip()
    common = dict(
        context_length=context_length, max_pixels=max_pixels, max_skip_fraction=max_skip_fraction,
        min_seen=min_seen, return_caption=return_caption,
    )
    streaming = dict(common, rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer)
    mapped = dict(common, seed=seed)

    if task_name == "demo":
        from paddlemix.data.demo import describe, make_demo_dataset

        paths = make_demo_dataset(data_root, **(demo_options or {}))
        _logger.info("Training on the %s", describe(paths))
        return CocoKarpathyDataset(str(paths.train_json), transform, tokenizer, image_root=str(paths.image_root),
                                   name="demo", **mapped)
    if task_name == "coco_karpathy":
        if not data_root:
            # As PaddleMIX does: its coco.tar, fetched and extracted once into the cache.
            from paddlemix.data.coco import coco_karpathy_root

            data_root = str(coco_karpathy_root())
        annotation, root = resolve_coco_karpathy(data_root, image_root)
        return CocoKarpathyDataset(annotation, transform, tokenizer, image_root=root, **mapped)

    lowered = task_name.lower()
    if "::" in task_name or "{" in task_name or lowered.endswith(_TAR_SUFFIXES):
        shards = expand_shard_pattern(task_name)
        if all(s.lower().endswith(_TAR_SUFFIXES) for s in shards):
            return WebDatasetTarDataset(shards, transform, tokenizer, caption_key=caption_key or "caption",
                                        name=f"webdataset:{task_name}", **streaming)
        raise ValueError(f"task_name={task_name!r} expands to non-tar files (e.g. {shards[0]!r}); {TASK_NAME_HELP}.")
    if lowered.endswith(".json"):
        return CocoKarpathyDataset(task_name, transform, tokenizer, image_root=image_root, **mapped)
    if lowered.endswith((".jsonl", ".csv", ".tsv")):
        return CaptionFileDataset(task_name, transform, tokenizer, image_key=image_key, caption_key=caption_key,
                                  separator=separator, image_root=image_root, **mapped)
    if lowered.endswith((".txt", ".filelist", ".gz")):
        return LaionFilelistDataset(task_name, transform, tokenizer, **streaming)
    raise ValueError(f"task_name={task_name!r} is not a known kind of training data; use {TASK_NAME_HELP}.")
