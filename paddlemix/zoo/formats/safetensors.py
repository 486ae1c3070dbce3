"""safetensors: header validation in front of reading, and a streaming, atomic writer.

safetensors is the preferred format: no code can hide in it, and tensors map straight from disk.
Before any tensor is touched, the whole header is validated here: its length, its JSON (duplicate
keys refused), each entry's dtype, shape and data offsets (in range, matching the shape, not
overlapping), so a hostile or truncated file fails with a :class:`CheckpointError` that names the
file and the entry.

Why the reading and writing are not the ``safetensors`` library's (installed with PaddleNLP; the
tests check both directions against it, and that files written here are byte for byte the
library's): its numpy API cannot give what loading a large model here relies on
(``benchmarks/bench_safetensors.py`` measures both).

- Reading: ``safe_open(framework="numpy").get_tensor`` returns a copy of every tensor, never a
  view of the file. With its default mmap backend the file's pages it touched stay resident until
  the file is closed, and nothing can hand them back (:func:`~.lazy.release` needs the mapping), so
  streaming a checkpoint bigger than memory grows the process to the checkpoint's size; its
  ``pread`` backend keeps the memory bound but copies every tensor once more. It cannot read BF16
  with numpy (``data type 'bfloat16' not understood``), which ``python -m paddlemix.convert --dtype
  bf16`` writes.
- Writing: ``serialize_file`` takes pointers to every tensor at once, so a converted multi-GB
  model would have to exist in memory as a whole; here each tensor (often a :class:`LazyArray`)
  is read only when its bytes are written. Its numpy writer also stores Fortran-ordered arrays in
  memory order, which reloads as different values.

What is left by hand is small: ``np.frombuffer`` over the validated offsets, and a writer that
lays tensors out as the library does (widest dtype first, then by name), writes to a temporary
file, syncs it and renames it over the target.
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
import tempfile
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from .common import CheckpointError, PathLike, file_error, is_int, map_file
from .lazy import LazyArray, bf16_bits_to_float32, release

__all__ = ["load_safetensors", "safetensors_metadata", "save_safetensors", "save_safetensors_sharded"]

# The safetensors reference implementation refuses headers above 100 MB; so do we, so a
# corrupt length field cannot make us allocate gigabytes.
_MAX_SAFETENSORS_HEADER = 100_000_000

_SAFETENSORS_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 on load
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),  # normalised to 0/1 numpy bools on load
}
_NUMPY_TO_SAFETENSORS = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
# The order in which the safetensors library lays tensors out in a file (its dtype enum, widest first).
_WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")


class _TensorEntry(NamedTuple):
    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int
    end: int


def _reject_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CheckpointError(f"duplicate key {key!r} in JSON")
        result[key] = value
    return result


def _read_safetensors_header(path: PathLike, mm: mmap.mmap) -> Tuple[List[_TensorEntry], Dict[str, str], int]:
    """Validate the whole header before any tensor is touched.

    Returns the entries, the ``__metadata__`` dict and the absolute offset of the data region.
    """
    size = len(mm)
    if size < 8:
        raise file_error(path, f"safetensors file is {size} bytes, shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", mm[:8])
    if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise file_error(
            path,
            f"safetensors header length {header_len} does not fit the file ({size} bytes); "
            "the file is truncated or not safetensors",
        )
    data_start = 8 + header_len
    try:
        header = json.loads(bytes(mm[8:data_start]).decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise file_error(path, f"safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise file_error(path, f"safetensors header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise file_error(path, "safetensors __metadata__ must map strings to strings")

    data_size = size - data_start
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise file_error(path, f"tensor {name!r}: header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise file_error(
                path, f"tensor {name!r}: unsupported dtype {dtype!r} (supported: {', '.join(_SAFETENSORS_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise file_error(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            raise file_error(path, f"tensor {name!r}: data_offsets {offsets!r} is not a pair of integers")
        start, end = offsets
        if not 0 <= start <= end <= data_size:
            raise file_error(
                path, f"tensor {name!r}: data_offsets [{start}, {end}] fall outside the data region of {data_size} bytes"
            )
        expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if expected != end - start:
            raise file_error(
                path, f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, data_offsets give {end - start}"
            )
        entries.append(_TensorEntry(name, dtype, tuple(shape), start, end))

    previous: Optional[_TensorEntry] = None
    for entry in sorted((e for e in entries if e.end > e.start), key=lambda e: e.start):
        if previous is not None and entry.start < previous.end:
            raise file_error(path, f"tensors {previous.name!r} and {entry.name!r} overlap in the data region")
        previous = entry
    return entries, metadata, data_start


def load_safetensors(path: PathLike) -> Dict[str, np.ndarray]:
    mm = map_file(path)
    entries, _, data_start = _read_safetensors_header(path, mm)
    tensors: Dict[str, np.ndarray] = {}
    for entry in entries:
        dtype = _SAFETENSORS_DTYPES[entry.dtype]
        count = math.prod(entry.shape)
        if count == 0:
            array = np.empty(entry.shape, dtype=dtype)
        else:
            array = np.frombuffer(mm, dtype=dtype, count=count, offset=data_start + entry.start).reshape(entry.shape)
        if entry.dtype == "BF16":
            array = LazyArray(bf16_bits_to_float32, array, shape=entry.shape, dtype=np.float32)
        elif entry.dtype == "BOOL":
            array = LazyArray(np.not_equal, array, np.uint8(0), shape=entry.shape, dtype=np.bool_)
        tensors[entry.name] = array
    return tensors


def safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if it has none), header validated."""
    mm = map_file(path)
    try:
        return _read_safetensors_header(path, mm)[1]
    finally:
        mm.close()


class _Planned(NamedTuple):
    name: str
    value: Any  # np.ndarray or LazyArray (read only when written)
    shape: Tuple[int, ...]
    dtype: np.dtype  # as stored (little-endian)
    code: str  # the safetensors dtype name


def _safetensors_payload(
    path: PathLike, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]], bfloat16: Collection[str]
) -> Tuple[bytes, List[_Planned]]:
    """The header, from names, shapes and dtypes alone, and the tensors in the order it places them."""
    header: Dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise file_error(path, "safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    unknown_bf16 = set(bfloat16) - set(tensors)
    if unknown_bf16:
        raise file_error(path, f"bfloat16 names {sorted(unknown_bf16)} are not among the tensors")
    planned = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise file_error(path, f"invalid tensor name {name!r}")
        if isinstance(value, LazyArray):
            if value.shape is None:
                raise file_error(path, f"tensor {name!r} is a LazyArray of unknown shape; give its shape to write it")
        else:
            value = np.asarray(value)
        dtype = value.dtype
        native = dtype.newbyteorder("=")
        if name in bfloat16:
            if dtype != np.uint16:
                raise file_error(path, f"bfloat16 tensor {name!r} must be given as uint16 bits (see to_bfloat16_bits), got {dtype}")
            code = "BF16"
        elif native in _NUMPY_TO_SAFETENSORS:
            code = _NUMPY_TO_SAFETENSORS[native]
        else:
            raise file_error(
                path,
                f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; supported: "
                f"{', '.join(str(d) for d in _NUMPY_TO_SAFETENSORS)}",
            )
        shape = tuple(int(d) for d in value.shape)
        planned.append(_Planned(name, value, shape, dtype.newbyteorder("<"), code))
    # The safetensors library's layout: widest dtype first, then by name, so every tensor's data
    # is aligned to its element size and the file is byte for byte what the library writes.
    planned.sort(key=lambda t: (_WRITE_ORDER.index(t.code), t.name))
    offset = 0
    for tensor in planned:
        nbytes = math.prod(tensor.shape) * tensor.dtype.itemsize
        entry = {"dtype": tensor.code, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        header[tensor.name] = entry
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep the data region 8-byte aligned for mmap readers
    return blob, planned


def _write_planned(path: PathLike, f: Any, tensor: _Planned) -> None:
    """Read one tensor, check it is what the header promised, write it, let its pages go."""
    array = np.asarray(tensor.value)
    if tuple(array.shape) != tensor.shape or array.dtype.newbyteorder("<") != tensor.dtype:
        raise file_error(path, f"tensor {tensor.name!r} came out as {array.dtype} {list(array.shape)}, "
                           f"expected {tensor.dtype} {list(tensor.shape)}")
    f.write(np.ascontiguousarray(array, dtype=tensor.dtype).reshape(-1).view(np.uint8).data)
    del array
    release(tensor.value)


def save_safetensors(
    tensors: Mapping[str, np.ndarray],
    path: PathLike,
    metadata: Optional[Mapping[str, str]] = None,
    *,
    bfloat16: Collection[str] = (),
) -> None:
    """Write ``tensors`` as a safetensors file, atomically, one tensor at a time.

    Values may be arrays or :class:`LazyArray` of known shape and dtype: the header is
    written from those, and each value is read only when its bytes are written, so a
    converted multi-GB checkpoint never exists in memory as a whole. Tensors are laid out (and
    read) in the safetensors library's order: widest dtype first, then by name.

    The file is written to a temporary name in the same directory, synced and renamed over
    ``path``, so a crash or full disk never leaves a half-written checkpoint under the real
    name. numpy has no bfloat16: to store BF16, pass uint16 bits (from
    :func:`to_bfloat16_bits`) and list their names in ``bfloat16``.
    """
    path = os.fspath(path)
    blob, planned = _safetensors_payload(path, tensors, metadata, frozenset(bfloat16))
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise file_error(path, f"cannot create a file in {directory} ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for tensor in planned:
                _write_planned(path, f, tensor)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise file_error(path, f"cannot write file ({e.strerror or e})") from e
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def save_safetensors_sharded(
    tensors: Mapping[str, Any],
    directory: PathLike,
    max_shard_bytes: int,
    metadata: Optional[Mapping[str, str]] = None,
    *,
    bfloat16: Collection[str] = (),
    prefix: str = "model",
) -> List[str]:
    """Write ``tensors`` as safetensors shards of at most ``max_shard_bytes`` each (a tensor
    bigger than that gets a shard of its own) plus an HF-style ``<prefix>.safetensors.index.json``.

    When everything fits in one shard the result is a plain ``<prefix>.safetensors`` and no
    index. Values are read one at a time, as in :func:`save_safetensors`. Returns the file
    names written, index last.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = os.fspath(directory)
    bf16 = frozenset(bfloat16)
    groups: List[List[str]] = [[]]
    size = total = 0
    for name, value in tensors.items():
        nbytes = math.prod(value.shape) * value.dtype.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
        total += nbytes
    if len(groups) == 1:
        save_safetensors(tensors, os.path.join(directory, f"{prefix}.safetensors"), metadata, bfloat16=bf16)
        return [f"{prefix}.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(groups):
        file = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_safetensors({n: tensors[n] for n in names}, os.path.join(directory, file), metadata,
                         bfloat16=[n for n in names if n in bf16])
        weight_map.update((n, file) for n in names)
        files.append(file)
    index = f"{prefix}.safetensors.index.json"
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=f".{index}.", suffix=".tmp", delete=False,
                                     encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total, **dict(metadata or {})}, "weight_map": weight_map}, f, indent=1)
    os.chmod(f.name, 0o644)
    os.replace(f.name, os.path.join(directory, index))
    return files + [index]
