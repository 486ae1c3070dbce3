"""Read weights files of any supported format, without torch and without running code from them.

Released CLIP weights come as safetensors, torch pickles (``.bin``/``.pt``/``.pth``) or Paddle
``.pdparams`` pickles, single files or shards behind an HF-style ``*.index.json``. This module is
the front: it recognises the format from the content, finds the weights in a directory, reads
index files, and unwraps training checkpoints to a flat ``name -> array`` dict. Each format's
reader and writer lives in :mod:`paddlemix.zoo.formats`, which says why each is hand-written.

Tensors come out as numpy arrays: read-only views of the memory-mapped file where the bytes are
stored as they are meant (copy with ``np.array(a)`` before writing to one), or
:class:`LazyArray` where they need decoding. Every failure is a :class:`CheckpointError` that
names the file and the problem.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any, Dict, Iterator, List, Mapping

import numpy as np

from .formats.common import CheckpointError, PathLike, file_error, parse_errors_as
from .formats.lazy import LazyArray, release, to_bfloat16_bits
from .formats.pdparams import load_pdparams
from .formats.safetensors import load_safetensors, safetensors_metadata, save_safetensors, save_safetensors_sharded
from .formats.torch_pickle import TORCH_LEGACY_MAGIC, load_torch_legacy, load_torch_zip

# The formats' public names are part of this module's API too (one import for weights files).
__all__ = [
    "CheckpointError",
    "LazyArray",
    "release",
    "load_state_dict",
    "iter_checkpoint_shards",
    "unwrap_state_dict",
    "find_checkpoint_file",
    "safetensors_metadata",
    "save_safetensors",
    "save_safetensors_sharded",
    "to_bfloat16_bits",
]

logger = logging.getLogger(__name__)

# Checkpoint file names looked for in a directory, best first: safetensors needs no
# unpickling at all and maps straight from disk.
CHECKPOINT_FILE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
    "model_state.pdparams",
)

# Keys under which training scripts nest the weights next to optimizer state, epoch, etc.
_WRAPPER_KEYS = ("state_dict", "model", "module")
_DDP_PREFIX = "module."

_MAX_INDEX_BYTES = 64 * 1024 * 1024

# Numeric kinds a state dict entry may have; object, string and structured arrays are not weights.
_TENSOR_KINDS = "biuf"


def _sniff(path: PathLike) -> str:
    """Name the format from the file's first bytes; the suffix is only used in messages."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise file_error(path, f"cannot read file ({e.strerror or e})") from e
    if not head:
        raise file_error(path, "file is empty")
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if os.fspath(path).endswith(".safetensors"):
        return "safetensors"  # damaged header: let the parser say what is wrong with it
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        magic = b"\x8a\x0a" + TORCH_LEGACY_MAGIC.to_bytes(10, "little")
        # Protocol 4+ pickles may start with a 9-byte FRAME opcode.
        if head[2:14] == magic or (head[2:3] == b"\x95" and head[11:23] == magic):
            return "torch-legacy"
        return "pickle"
    if head[257:262] == b"ustar":
        raise file_error(
            path,
            "this is a tar-format torch checkpoint from before PyTorch 1.0, which is not supported; re-save it "
            "with a recent torch as safetensors (safetensors.torch.save_file) and load that",
        )
    if head.startswith(b"version https://git-lfs"):
        raise file_error(path, "this is a Git LFS pointer, not the weights; fetch the real file with `git lfs pull`")
    if head.lstrip()[:1] == b"{":
        return "index"
    raise file_error(
        path,
        f"unrecognised weights format (first bytes {head[:16]!r}); expected safetensors, a torch .bin/.pt/.pth, "
        "a Paddle .pdparams, or a *.index.json of shards",
    )


def find_checkpoint_file(directory: PathLike) -> str:
    """The weights file of a checkpoint directory, preferring safetensors over pickles."""
    for name in CHECKPOINT_FILE_NAMES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    try:
        present = sorted(os.listdir(directory))
    except OSError as e:
        raise file_error(directory, f"cannot list directory ({e.strerror or e})") from e
    raise file_error(
        directory,
        f"no weights file found; looked for {', '.join(CHECKPOINT_FILE_NAMES)}; "
        f"the directory has {present[:30] if present else 'no files'}",
    )


def _resolve(path: PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return find_checkpoint_file(path)
    if not os.path.exists(path):
        raise file_error(path, "no such file or directory")
    return path


def _load_object(path: str, fmt: str) -> Any:
    if fmt == "safetensors":
        with parse_errors_as(path, "safetensors file"):
            return load_safetensors(path)
    if fmt == "torch-zip":
        return load_torch_zip(path)
    if fmt == "torch-legacy":
        return load_torch_legacy(path)
    if fmt == "pickle":
        return load_pdparams(path)
    raise file_error(path, f"a shard must be a weights file, not {fmt}")


def _is_tensor(value: Any) -> bool:
    return (
        isinstance(value, (np.ndarray, LazyArray)) and value.dtype.kind in _TENSOR_KINDS and value.dtype.fields is None
    )


def unwrap_state_dict(obj: Any, source: str = "checkpoint", strip_prefix: bool = True) -> Dict[str, np.ndarray]:
    """The flat name -> array dict inside a loaded checkpoint object.

    Training scripts save ``{"state_dict": ..., "epoch": ..., "optimizer": ...}`` (or under
    ``model``/``module``); the weights are found under those keys, other entries are
    ignored, and a ``module.`` prefix that every name shares (DistributedDataParallel) is
    removed so names match the bare model.
    """
    current = obj
    for _ in range(8):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(current, Mapping):
            raise CheckpointError(f"{source}: expected a dict of tensors, found {type(current).__name__}")
        inner = next((current[k] for k in _WRAPPER_KEYS if isinstance(current.get(k), Mapping)), None)
        if inner is None:
            break
        current = inner
    tensors = {k: v for k, v in current.items() if isinstance(k, str) and _is_tensor(v)}
    ignored = [k for k in current if k not in tensors]
    if ignored:
        logger.debug("%s: ignoring %d non-tensor entries: %s", source, len(ignored), ignored[:10])
    if not tensors:
        raise CheckpointError(
            f"{source}: no tensors found (top-level keys: {[str(k) for k in list(current)[:10]]})"
        )
    if strip_prefix and all(k.startswith(_DDP_PREFIX) for k in tensors):
        tensors = _strip_ddp_prefix(tensors)
    return tensors


def _strip_ddp_prefix(tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {k[len(_DDP_PREFIX):] if k.startswith(_DDP_PREFIX) else k: v for k, v in tensors.items()}


def _read_index(path: str) -> Dict[str, List[str]]:
    """Shard file -> the tensor names the index places in it, in shard-name order."""
    with parse_errors_as(path, "index JSON"):
        if os.path.getsize(path) > _MAX_INDEX_BYTES:
            raise file_error(path, f"index file is larger than {_MAX_INDEX_BYTES} bytes")
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise file_error(path, "index JSON has no 'weight_map' object mapping tensor names to shard files")
    shards: Dict[str, List[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise file_error(path, f"weight_map entry {name!r} -> {shard!r} is not a file name")
        normalised = os.path.normpath(shard)
        if os.path.isabs(shard) or normalised.split(os.sep)[0] == "..":
            raise file_error(path, f"shard {shard!r} is outside the index's directory")
        shards.setdefault(normalised, []).append(name)
    return dict(sorted(shards.items()))


def _iter_index(path: str) -> Iterator[Dict[str, np.ndarray]]:
    shards = _read_index(path)
    every_name = [name for names in shards.values() for name in names]
    strip = all(name.startswith(_DDP_PREFIX) for name in every_name)
    directory = os.path.dirname(path)
    for shard, names in shards.items():
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise file_error(path, f"shard {shard!r} listed in the index does not exist")
        tensors = unwrap_state_dict(_load_object(shard_path, _sniff(shard_path)), source=shard_path, strip_prefix=False)
        missing = [name for name in names if name not in tensors]
        if missing:
            raise file_error(shard_path, f"the index places {missing[:10]} in this shard, but it does not contain them")
        if strip:
            tensors = _strip_ddp_prefix(tensors)
        yield tensors


def iter_checkpoint_shards(path: PathLike) -> Iterator[Dict[str, np.ndarray]]:
    """Yield a checkpoint's tensors one shard at a time (a single file is one shard).

    Values are read-only numpy views of the mapped file, or :class:`LazyArray` where the
    stored bytes need decoding first; nothing is read until a value is. A loader that reads
    one tensor at a time, copies it into the model and releases it (:func:`release`) keeps host
    memory near one tensor beyond the model. ``path`` may be a weights file, an HF-style
    ``*.index.json``, or a checkpoint directory.
    """
    resolved = _resolve(path)
    fmt = _sniff(resolved)
    if fmt == "index":
        yield from _iter_index(resolved)
    else:
        yield unwrap_state_dict(_load_object(resolved, fmt), source=resolved)


def load_state_dict(path: PathLike) -> Dict[str, np.ndarray]:
    """All tensors of a weights file, index of shards, or checkpoint directory, by name.

    The format is recognised from the content: safetensors, torch zip pickles (torch >= 1.6),
    legacy torch pickles, and Paddle ``.pdparams``. bfloat16 tensors are widened to float32
    exactly, except in ``.pdparams``, where Paddle itself stores bfloat16 as uint16 bits.
    """
    merged: Dict[str, np.ndarray] = {}
    for shard in iter_checkpoint_shards(path):
        duplicates = merged.keys() & shard.keys()
        if duplicates:
            raise file_error(path, f"tensors {sorted(duplicates)[:10]} appear in more than one shard")
        merged.update((name, np.asarray(value)) for name, value in shard.items())
    return merged
