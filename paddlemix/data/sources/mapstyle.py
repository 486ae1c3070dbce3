"""Map-style sources: a COCO Karpathy JSON and custom JSONL/CSV files of (image path, caption).

The index fits in memory, so these are ``paddle.io.Dataset`` s and the Trainer's distributed batch
sampler shards and shuffles them. Annotation rows that cannot be used (bad JSON, bad UTF-8, no
caption, no image field) are dropped when the file is read and counted in ``parse_skips``.

A bad image can only be discovered when loading, and ``__getitem__`` must return a sample: it then
returns the next loadable entry (index + 1, + 2, ...) and counts the skip. Replacing keeps every
batch full, which the contrastive loss needs (all ranks gather equal-sized batches); the cost is that
the replacement entry is seen twice in that epoch, which is harmless at realistic skip rates.
Filtering in the collate function instead would give ragged batch sizes across ranks.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle.io

from paddlemix.data.sources.common import (
    DEFAULT_MAX_PIXELS,
    SampleError,
    SkipCounter,
    SkippedTooManyError,
    clean_caption,
    decode_image,
    make_sample,
    reseed_transform,
)

__all__ = ["CaptionFileDataset", "CaptionListDataset", "CocoKarpathyDataset"]

_logger = logging.getLogger(__name__)

DEFAULT_IMAGE_KEYS = ("image", "filepath")
DEFAULT_CAPTION_KEYS = ("caption", "title")


class CaptionListDataset(paddle.io.Dataset):
    """(image path, caption) entries loaded and transformed on access.

    Args:
        entries: (image path, caption) pairs; relative paths are joined to ``image_root``.
        transform: PIL image -> float32 CHW array (``output='numpy'``).
        tokenizer: has ``batch_encode(texts, context_length) -> int64 [N, L]``.
        image_root: folder of relative image paths (None: paths are used as given).
        context_length: token length; None uses the tokenizer's default.
        seed: augmentation of entry ``i`` in epoch ``e`` is drawn from (seed, e, i), so it does not
            depend on which loader worker loads it (exact resume); None leaves the transform's own
            random source alone.
        max_retries: how many following entries to try when one cannot be loaded.
        max_pixels, min_image_size: images outside are skipped ('too_large' / 'too_small').
        max_skip_fraction, min_seen: see ``SkipCounter`` (applied to loads, and to the rows read).
        return_caption: also return the caption string (debugging).
        parse_skips: counter holding the rows dropped when the annotation file was read.
        name: shown in logs.
    """

    def __init__(
            self,
            entries: Sequence[Tuple[str, str]],
            transform: Callable[[Any], np.ndarray],
            tokenizer: Any,
            image_root: Optional[str] = None,
            context_length: Optional[int] = None,
            seed: Optional[int] = 0,
            max_retries: int = 100,
            max_pixels: int = DEFAULT_MAX_PIXELS,
            min_image_size: int = 1,
            max_skip_fraction: float = 0.1,
            min_seen: int = 1000,
            return_caption: bool = False,
            parse_skips: Optional[SkipCounter] = None,
            name: str = "captions",
    ):
        super().__init__()
        self.name = name
        if not entries:
            detail = f" ({parse_skips.summary()})" if parse_skips is not None else ""
            raise ValueError(f"{name}: no usable (image, caption) entry{detail}.")
        self.image_paths = [p if image_root is None else os.path.join(image_root, p) for p, _ in entries]
        self.captions = [c for _, c in entries]
        self.transform = transform
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.seed = seed
        self.max_retries = max(1, int(max_retries))
        self.max_pixels = int(max_pixels)
        self.min_image_size = int(min_image_size)
        self.return_caption = bool(return_caption)
        self.epoch = 0
        self.skips = SkipCounter(max_skip_fraction=max_skip_fraction, min_seen=min_seen, name=name)
        self.parse_skips = parse_skips or SkipCounter(max_skip_fraction, min_seen, name=f"{name} (rows)")

    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int) -> None:
        """Changes the augmentation draws; the order is the sampler's business."""
        self.epoch = int(epoch)

    def load(self, index: int) -> Dict[str, Any]:
        """Entry ``index`` as a sample, or ``SampleError`` (no replacement)."""
        if self.seed is not None:
            reseed_transform(self.transform, (self.seed, self.epoch, index))
        image = decode_image(self.image_paths[index], self.max_pixels, self.min_image_size)
        return make_sample(image, self.captions[index], self.transform, self.tokenizer, self.context_length,
                           self.return_caption)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        n = len(self.image_paths)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {self.name} with {n} entries.")
        index %= n
        for attempt in range(min(self.max_retries, n)):
            i = (index + attempt) % n
            try:
                sample = self.load(i)
            except SampleError as e:
                self.skips.skip(e.reason, e.detail)
                continue
            self.skips.ok()
            return sample
        raise SkippedTooManyError(
            f"{self.name}: none of the {min(self.max_retries, n)} entries from index {index} could be loaded; "
            f"{self.skips.summary()}. Check image_root and the image files."
        )


def _add_entry(entries: List[Tuple[str, str]], image: str, caption: Any, where: str, parse_skips: SkipCounter) -> None:
    try:
        entries.append((image, clean_caption(caption)))
    except SampleError as e:
        parse_skips.skip(e.reason, f"{where}: {e.detail}", check=False)
        return
    parse_skips.ok()


def _finish_parse(parse_skips: SkipCounter) -> None:
    if parse_skips.skipped:
        parse_skips.log_summary(logging.WARNING)
    parse_skips.check()  # on the whole file: a bad stretch at the start must not abort a good file


# ---------------------------------------------------------------------------------------------------
# COCO Karpathy
# ---------------------------------------------------------------------------------------------------

def read_coco_karpathy(path: str, parse_skips: SkipCounter) -> List[Tuple[str, str]]:
    """(image, caption) pairs of a Karpathy-split JSON; a list of captions gives one pair per caption."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO Karpathy annotation file {path!r} does not exist.")
    with open(path, "rb") as f:
        try:
            records = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path} is not a UTF-8 JSON file: {e}") from None
    if not isinstance(records, list):
        raise ValueError(
            f"{path} holds a JSON {type(records).__name__}; the COCO Karpathy layout is a list of "
            f'{{"caption", "image", "image_id"}} objects.'
        )
    entries = []
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"]:
            parse_skips.skip("bad_row", f"{path} item {n}: no 'image' path", check=False)
            continue
        captions = rec.get("caption")
        captions = captions if isinstance(captions, list) else [captions]
        for caption in captions:
            _add_entry(entries, rec["image"], caption, f"{path} item {n}", parse_skips)
    _finish_parse(parse_skips)
    return entries


class CocoKarpathyDataset(CaptionListDataset):
    """COCO Karpathy JSON (``[{"caption", "image", "image_id"}]``), images relative to ``image_root``.

    ``image_root`` defaults to the annotation file's folder (the demo dataset's layout).
    """

    def __init__(
            self,
            annotation_file: str,
            transform: Callable[[Any], np.ndarray],
            tokenizer: Any,
            image_root: Optional[str] = None,
            max_skip_fraction: float = 0.1,
            min_seen: int = 1000,
            **kwargs: Any,
    ):
        name = kwargs.pop("name", f"coco:{annotation_file}")
        parse_skips = SkipCounter(max_skip_fraction, min_seen, name=f"{name} (rows)")
        entries = read_coco_karpathy(annotation_file, parse_skips)
        if image_root is None:
            image_root = os.path.dirname(os.path.abspath(annotation_file))
        super().__init__(
            entries, transform, tokenizer, image_root=image_root, max_skip_fraction=max_skip_fraction,
            min_seen=min_seen, parse_skips=parse_skips, name=name, **kwargs,
        )


# ---------------------------------------------------------------------------------------------------
# JSONL / CSV
# ---------------------------------------------------------------------------------------------------

def _pick(row: Dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _utf8_lines(path: str, parse_skips: SkipCounter) -> Iterator[Tuple[int, str]]:
    """(line number, text) of a file read line by line, bad UTF-8 lines counted and dropped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                parse_skips.skip("bad_utf8", f"{path} line {number}: {e}", check=False)


def read_jsonl(path: str, image_keys: Sequence[str], caption_keys: Sequence[str],
               parse_skips: SkipCounter) -> List[Tuple[str, str]]:
    entries = []
    for number, text in _utf8_lines(path, parse_skips):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            parse_skips.skip("bad_json", f"{path} line {number}: {e}", check=False)
            continue
        if not isinstance(row, dict):
            parse_skips.skip("bad_json", f"{path} line {number}: a {type(row).__name__}, not an object", check=False)
            continue
        image = _pick(row, image_keys)
        if not isinstance(image, str) or not image:
            parse_skips.skip("bad_row", f"{path} line {number}: no image field among {list(image_keys)}", check=False)
            continue
        _add_entry(entries, image, _pick(row, caption_keys), f"{path} line {number}", parse_skips)
    _finish_parse(parse_skips)
    return entries


def read_csv(path: str, image_keys: Sequence[str], caption_keys: Sequence[str], separator: Optional[str],
             parse_skips: SkipCounter) -> List[Tuple[str, str]]:
    """A CSV/TSV with a header row. ``separator=None``: tab if the header has one (open_clip's
    ``--csv-separator`` default), else comma."""
    lines = [text for _, text in _utf8_lines(path, parse_skips)]
    if not lines:
        raise ValueError(f"{path} is empty; a CSV needs a header row naming the image and caption columns.")
    if separator is None:
        separator = "\t" if "\t" in lines[0] else ","
    reader = csv.DictReader(io.StringIO("".join(lines)), delimiter=separator)
    header = reader.fieldnames or []
    image_col = next((k for k in image_keys if k in header), None)
    caption_col = next((k for k in caption_keys if k in header), None)
    if image_col is None or caption_col is None:
        raise ValueError(
            f"{path}: header {header} (separator {separator!r}) lacks an image column {list(image_keys)} or a "
            f"caption column {list(caption_keys)}; pass image_key= / caption_key= / separator=."
        )
    entries = []
    for number, row in enumerate(reader, start=1):
        image = row.get(image_col)
        # csv fills a short row with None values and puts extra fields under the key None
        if not image or None in row or any(v is None for v in row.values()):
            parse_skips.skip("bad_row", f"{path} data row {number}: not {len(header)} fields", check=False)
            continue
        _add_entry(entries, image, row.get(caption_col), f"{path} data row {number}", parse_skips)
    _finish_parse(parse_skips)
    return entries


class CaptionFileDataset(CaptionListDataset):
    """A custom JSONL (one object per line) or CSV/TSV (header row) of image paths and captions.

    Args:
        path: ``.jsonl`` or ``.csv`` / ``.tsv`` file.
        image_key: image path field; default the first present of ``image``, ``filepath``.
        caption_key: caption field; default the first present of ``caption``, ``title``.
        separator: CSV delimiter; None sniffs tab vs comma from the header.
        image_root: folder of relative image paths; default the file's folder.
        **kwargs: see ``CaptionListDataset``.
    """

    def __init__(
            self,
            path: str,
            transform: Callable[[Any], np.ndarray],
            tokenizer: Any,
            image_key: Optional[str] = None,
            caption_key: Optional[str] = None,
            separator: Optional[str] = None,
            image_root: Optional[str] = None,
            max_skip_fraction: float = 0.1,
            min_seen: int = 1000,
            **kwargs: Any,
    ):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Caption file {path!r} does not exist.")
        name = kwargs.pop("name", f"captions:{path}")
        image_keys = (image_key,) if image_key else DEFAULT_IMAGE_KEYS
        caption_keys = (caption_key,) if caption_key else DEFAULT_CAPTION_KEYS
        parse_skips = SkipCounter(max_skip_fraction, min_seen, name=f"{name} (rows)")
        if path.endswith(".jsonl"):
            entries = read_jsonl(path, image_keys, caption_keys, parse_skips)
        elif path.endswith((".csv", ".tsv")):
            entries = read_csv(path, image_keys, caption_keys, separator, parse_skips)
        else:
            raise ValueError(f"{path}: unknown caption file type; use .jsonl, .csv or .tsv.")
        if image_root is None:
            image_root = os.path.dirname(os.path.abspath(path))
        super().__init__(
            entries, transform, tokenizer, image_root=image_root, max_skip_fraction=max_skip_fraction,
            min_seen=min_seen, parse_skips=parse_skips, name=name, **kwargs,
        )
