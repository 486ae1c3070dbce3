"""Streaming sources for web-scale data: PaddleMIX LAION part files and webdataset tar shards.

Both are ``paddle.io.IterableDataset`` s that shard themselves: the parts (part files or shards) are
permuted with ``seed + epoch`` identically on every reader, and reader ``r`` of ``R`` readers (one per
(rank, loader worker) pair, rank-major) takes parts ``r, r + R, ...``. With fewer parts than readers,
every reader walks all parts and keeps the records whose running index is ``r`` modulo ``R``. Either
way each record is read by exactly one reader per epoch. Within a reader, records pass through a
shuffle buffer seeded by (seed, epoch, reader), so ``set_epoch`` changes the order but not the set.

Ranks may get different sample counts in one epoch (parts differ in size); train by steps
(``max_steps``), as usual with streams.

Records are kept raw (undecoded line or tar members) until they leave the shuffle buffer, so the
buffer costs compressed bytes, not decoded images.
"""
from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
import os
import tarfile
import zlib
from pathlib import PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle.io

from paddlemix.data.sources.common import (
    DEFAULT_MAX_PIXELS,
    SampleError,
    SkipCounter,
    clean_caption,
    decode_image,
    expand_shard_pattern,
    make_sample,
    reader_slot,
    reseed_transform,
    shuffle_buffer,
)

__all__ = [
    "LaionFilelistDataset",
    "StreamingCaptionDataset",
    "WebDatasetTarDataset",
    "assign_parts",
    "read_filelist",
]

_logger = logging.getLogger(__name__)

# Errors that end the reading of one part early: truncated or corrupt gzip/tar streams.
_PART_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError)


def assign_parts(
        num_parts: int, reader: int, num_readers: int, seed: int, epoch: int, shuffle: bool = True
) -> Tuple[List[int], int, int]:
    """Which parts reader ``reader`` walks, and which of their records it keeps.

    Returns (part indices in reading order, keep_offset, keep_stride): the reader keeps record ``k``
    (counted over the parts it walks, from 0) when ``k % keep_stride == keep_offset``.
    """
    if not 0 <= reader < num_readers:
        raise ValueError(f"reader={reader} must be in [0, num_readers={num_readers}).")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(num_parts) if shuffle else np.arange(num_parts)
    order = [int(i) for i in order]
    if num_parts >= num_readers:
        return order[reader::num_readers], 0, 1
    return order, reader, num_readers


class StreamingCaptionDataset(paddle.io.IterableDataset):
    """Base of the streaming sources: sharding, shuffling, skip accounting; subclasses parse records.

    Args:
        parts: part files / shards.
        transform: PIL image -> float32 CHW array (build it with ``output='numpy'``).
        tokenizer: has ``batch_encode(texts, context_length) -> int64 [N, L]``.
        context_length: token length; None uses the tokenizer's default.
        rank, world_size: this process's data-parallel (x sharding) rank and the data world size.
        seed: part order, shuffle buffer and augmentation are drawn from (seed, epoch, reader).
        shuffle: False reads parts and records in order (useful for checking data).
        shuffle_buffer: records held for shuffling within a reader (raw bytes each).
        max_pixels, min_image_size: images outside are skipped ('too_large' / 'too_small').
        max_skip_fraction, min_seen: see ``SkipCounter``.
        return_caption: also return the caption string (for debugging; breaks default collation
            only if the collate function cannot handle strings).
        name: shown in logs.
    """

    def __init__(
            self,
            parts: Sequence[str],
            transform: Callable[[Any], np.ndarray],
            tokenizer: Any,
            context_length: Optional[int] = None,
            rank: int = 0,
            world_size: int = 1,
            seed: int = 0,
            shuffle: bool = True,
            shuffle_buffer: int = 1000,
            max_pixels: int = DEFAULT_MAX_PIXELS,
            min_image_size: int = 1,
            max_skip_fraction: float = 0.1,
            min_seen: int = 1000,
            return_caption: bool = False,
            name: Optional[str] = None,
    ):
        super().__init__()
        if not parts:
            raise ValueError("A streaming dataset needs at least one part file / shard.")
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        self.parts = [str(p) for p in parts]
        self.transform = transform
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer)
        self.max_pixels = int(max_pixels)
        self.min_image_size = int(min_image_size)
        self.return_caption = bool(return_caption)
        self.epoch = 0
        self.name = name or self.__class__.__name__
        self.skips = SkipCounter(max_skip_fraction=max_skip_fraction, min_seen=min_seen, name=self.name)
        self._check_parts_exist()

    def _check_parts_exist(self) -> None:
        missing = [p for p in self.parts if not os.path.isfile(p)]
        if len(missing) == len(self.parts):
            raise FileNotFoundError(
                f"{self.name}: none of the {len(self.parts)} part files exists (first: {missing[0]!r}); "
                f"check the path or shard pattern."
            )
        if missing:
            _logger.warning(
                "%s: %d of %d part files are missing (e.g. %s); they will be skipped and counted.",
                self.name, len(missing), len(self.parts), missing[0],
            )

    def __len__(self) -> int:
        # TypeError (not Paddle's RuntimeError) is what ``list()`` and ``len()`` callers expect of an
        # unsized iterable; the Trainer's has_length() accepts either.
        raise TypeError(f"{self.name} is a stream without a known length; train by max_steps.")

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; call before iterating (loader workers copy the dataset then)."""
        self.epoch = int(epoch)

    # -- to implement ---------------------------------------------------------------------------

    def _read_part(self, path: str) -> Iterator[Any]:
        """Raw records of one part, cheaply (no image decoding)."""
        raise NotImplementedError

    def _decode_record(self, record: Any) -> Tuple[Any, str]:
        """(decoded PIL image, caption) of a raw record, or ``SampleError``."""
        raise NotImplementedError

    # -- iteration ------------------------------------------------------------------------------

    def _owned_records(self, reader: int, num_readers: int) -> Iterator[Any]:
        order, offset, stride = assign_parts(len(self.parts), reader, num_readers, self.seed, self.epoch, self.shuffle)
        k = 0
        for position, part_index in enumerate(order):
            path = self.parts[part_index]
            # In round-robin mode every reader walks every part: one of them accounts part-level errors.
            accounts_part = stride == 1 or position % num_readers == reader
            try:
                for record in self._read_part(path):
                    if k % stride == offset:
                        yield record
                    k += 1
            except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
                if accounts_part:
                    self.skips.skip("missing_file", f"{path}: {e}")
            except _PART_ERRORS as e:
                if accounts_part:
                    self.skips.skip("bad_shard", f"{path}: {type(e).__name__}: {e} (rest of the part skipped)")

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        reader, num_readers = reader_slot(self.rank, self.world_size)
        reseed_transform(self.transform, (self.seed, self.epoch, reader, 2))
        rng = np.random.default_rng([self.seed, self.epoch, reader, 1])
        records = self._owned_records(reader, num_readers)
        if self.shuffle:
            records = shuffle_buffer(records, self.shuffle_buffer, rng)
        produced = 0
        for record in records:
            try:
                image, caption = self._decode_record(record)
                sample = make_sample(image, caption, self.transform, self.tokenizer, self.context_length,
                                     self.return_caption)
            except SampleError as e:
                self.skips.skip(e.reason, e.detail)
                continue
            self.skips.ok()
            produced += 1
            yield sample
        if produced == 0:
            _logger.warning(
                "%s: reader %d of %d produced no sample in epoch %d (%d parts in total); %s",
                self.name, reader, num_readers, self.epoch, len(self.parts), self.skips.summary(),
            )
        elif self.skips.skipped:
            self.skips.log_summary()


# ---------------------------------------------------------------------------------------------------
# PaddleMIX LAION part files
# ---------------------------------------------------------------------------------------------------

def _open_maybe_gzip(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _first_line(path: str) -> bytes:
    with _open_maybe_gzip(path) as f:
        for line in f:
            if line.strip():
                return line
    return b""


def read_filelist(path: str) -> List[str]:
    """Part files listed in a PaddleMIX filelist (plain or .gz, one path per line).

    A file whose first line is already a tab-separated record is a part file itself and is returned
    alone. Relative paths are taken relative to the filelist's folder when they exist there, else
    to the working directory (where PaddleMIX resolves them).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LAION filelist {path!r} does not exist.")
    if b"\t" in _first_line(path):
        return [path]
    base = os.path.dirname(os.path.abspath(path))
    parts = []
    with _open_maybe_gzip(path) as f:
        for raw in f:
            entry = raw.decode("utf-8").strip()
            if not entry:
                continue
            if not os.path.isabs(entry) and os.path.exists(os.path.join(base, entry)):
                entry = os.path.join(base, entry)
            parts.append(entry)
    if not parts:
        raise ValueError(f"LAION filelist {path!r} lists no part file.")
    return parts


class LaionFilelistDataset(StreamingCaptionDataset):
    """PaddleMIX's LAION format: tab-separated lines with a caption JSON and a base64 image.

    Column indices are 0-based and default to PaddleMIX's reader (``LaionDataset.parse_line``), which
    takes the JSON from ``line.split('\\t')[2]`` and the image from ``[5]``. The caption is
    ``caption_en``, else ``blip_caption_en``. A line that is not UTF-8 is skipped ('bad_utf8'), where
    PaddleMIX retried it as GB18030.

    Args:
        filelist: a filelist path (or a single part file), or an explicit list of part paths.
        text_column, image_column: 0-based columns of the caption JSON and of the base64 image.
        min_image_size: PaddleMIX drops images with a side under 5 pixels; so does this default.
        **kwargs: see ``StreamingCaptionDataset``.
    """

    CAPTION_FIELDS = ("caption_en", "blip_caption_en")

    def __init__(
            self,
            filelist: Union[str, Sequence[str]],
            transform: Callable[[Any], np.ndarray],
            tokenizer: Any,
            text_column: int = 2,
            image_column: int = 5,
            min_image_size: int = 5,
            **kwargs: Any,
    ):
        parts = read_filelist(filelist) if isinstance(filelist, (str, os.PathLike)) else list(filelist)
        kwargs.setdefault("name", f"laion:{filelist}" if isinstance(filelist, str) else "laion")
        self.text_column = int(text_column)
        self.image_column = int(image_column)
        super().__init__(parts, transform, tokenizer, min_image_size=min_image_size, **kwargs)

    def _read_part(self, path: str) -> Iterator[bytes]:
        with _open_maybe_gzip(path) as f:
            for raw in f:
                line = raw.rstrip(b"\r\n")
                if line.strip():
                    yield line

    def _decode_record(self, line: bytes) -> Tuple[Any, str]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SampleError("bad_utf8", str(e)) from None
        columns = text.split("\t")
        if len(columns) <= max(self.text_column, self.image_column):
            raise SampleError(
                "bad_row",
                f"{len(columns)} tab-separated columns; need more than {max(self.text_column, self.image_column)}",
            )
        try:
            meta = json.loads(columns[self.text_column])
        except ValueError as e:
            raise SampleError("bad_json", f"column {self.text_column}: {e}") from None
        if not isinstance(meta, dict):
            raise SampleError("bad_json", f"column {self.text_column} is a {type(meta).__name__}, not an object")
        caption = next((meta[k] for k in self.CAPTION_FIELDS if isinstance(meta.get(k), str) and meta[k].strip()), None)
        caption = clean_caption(caption)
        try:
            data = base64.b64decode(columns[self.image_column].strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise SampleError("bad_base64", str(e)) from None
        if not data:
            raise SampleError("bad_base64", "empty image column")
        return decode_image(data, self.max_pixels, self.min_image_size), caption


# ---------------------------------------------------------------------------------------------------
# webdataset tar shards
# ---------------------------------------------------------------------------------------------------

def _is_unsafe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (bool(path.parts) and ":" in path.parts[0])


def _split_key(name: str) -> Tuple[str, str]:
    """webdataset's convention: the key is everything before the first dot of the file name."""
    folder, _, filename = name.rpartition("/")
    stem, dot, ext = filename.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


class WebDatasetTarDataset(StreamingCaptionDataset):
    """webdataset tar shards as img2dataset writes them: ``key.jpg`` + ``key.txt`` and/or ``key.json``.

    Shards are read with ``tarfile`` in stream mode, members into memory only: nothing is written to
    disk, and members with absolute or '..' paths are never read (their sample is skipped as
    'unsafe_path'). Members of one sample must be consecutive, as webdataset requires.

    Args:
        urls: a shard pattern with brace ranges, e.g. ``/data/{00000..00099}.tar`` (several joined by
            ``::``), or an explicit list of shard paths.
        caption_key: field of ``key.json`` used when there is no ``key.txt``.
        image_extensions: member extensions taken as the image, in order of preference.
        **kwargs: see ``StreamingCaptionDataset``.
    """

    def __init__(
            self,
            urls: Union[str, Sequence[str]],
            transform: Callable[[Any], np.ndarray],
            tokenizer: Any,
            caption_key: str = "caption",
            image_extensions: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
            **kwargs: Any,
    ):
        shards = expand_shard_pattern(urls) if isinstance(urls, str) else [str(u) for u in urls]
        remote = [s for s in shards if "://" in s or s.startswith("pipe:")]
        if remote:
            raise ValueError(
                f"Shard {remote[0]!r} is not a local file; only local (or mounted) tar shards are supported."
            )
        kwargs.setdefault("name", f"webdataset:{urls}" if isinstance(urls, str) else "webdataset")
        self.caption_key = caption_key
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        super().__init__(shards, transform, tokenizer, **kwargs)

    def _read_part(self, path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
        # An image member cannot usefully be bigger than max_pixels at 4 bytes per pixel.
        max_member_bytes = 4 * self.max_pixels
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            key, group = None, {}
            for member in tar:
                if not member.isfile():
                    continue  # directories, links, devices: never samples, never followed
                member_key, ext = _split_key(member.name)
                if member_key != key:
                    if group:
                        yield key, group
                    key, group = member_key, {}
                if _is_unsafe_member(member.name):
                    group["__unsafe__"] = member.name
                elif member.size > max_member_bytes:
                    group["__too_large__"] = f"{member.name}: {member.size} bytes"
                else:
                    handle = tar.extractfile(member)
                    group[ext] = handle.read() if handle is not None else b""
            if group:
                yield key, group

    def _caption(self, key: str, group: Dict[str, Any]) -> str:
        if "txt" in group:
            try:
                return clean_caption(group["txt"].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SampleError("bad_utf8", f"{key}.txt: {e}") from None
        if "json" in group:
            try:
                meta = json.loads(group["json"].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SampleError("bad_utf8", f"{key}.json: {e}") from None
            except ValueError as e:
                raise SampleError("bad_json", f"{key}.json: {e}") from None
            if not isinstance(meta, dict):
                raise SampleError("bad_json", f"{key}.json is a {type(meta).__name__}, not an object")
            return clean_caption(meta.get(self.caption_key))
        raise SampleError("missing_caption", f"{key}: no .txt or .json member")

    def _decode_record(self, record: Tuple[str, Dict[str, Any]]) -> Tuple[Any, str]:
        key, group = record
        if "__unsafe__" in group:
            raise SampleError("unsafe_path", group["__unsafe__"])
        if "__too_large__" in group:
            raise SampleError("too_large", group["__too_large__"])
        ext = next((e for e in self.image_extensions if e in group), None)
        if ext is None:
            raise SampleError("missing_image", f"{key}: members {sorted(group)}")
        caption = self._caption(key, group)
        return decode_image(group[ext], self.max_pixels, self.min_image_size), caption
