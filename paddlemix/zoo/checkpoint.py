"""Read and write weight files without torch and without running code from them.

Released CLIP weights come as safetensors, torch pickles (``.bin``/``.pt``/``.pth``) or
Paddle ``.pdparams`` pickles. ``torch.load`` and ``pickle.load`` execute whatever a pickle
asks for, so a downloaded ``.bin`` is a program, not data. Here every pickle goes through
an unpickler that resolves only the handful of globals a tensor state dict needs, each to
a local stand-in, and refuses everything else by name. Tensors come out as numpy arrays.

Files are memory-mapped: a tensor stored contiguously is a read-only view of the file and
is paged in only when copied into a model. Copy with ``np.array(a)`` before writing to it.
(Paddle ``.pdparams`` pickles hold their bytes inline, so those arrays are copies.)
:func:`iter_checkpoint_shards` goes further for loaders that stream: a tensor that needs
decoding (bfloat16, a foreign byte order, a strided view) arrives as a :class:`LazyArray`
that decodes only when read, and :func:`release` hands a tensor's mapped pages back once it
has been copied, so resident memory stays near one tensor beyond the model.

Refused, with advice: TorchScript archives (OpenAI's original ``ViT-*.pt``), tar-format
torch files from before 1.0, tensor types numpy lacks (complex, float8, quantized), and
tensor subclasses. bfloat16 is widened to float32 exactly on load; numpy has no bfloat16,
so writing one takes uint16 bits (:func:`to_bfloat16_bits`).

Every failure, from a truncated download to a refused global, is a :class:`CheckpointError`
that names the file and the problem.
"""
from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import math
import mmap
import os
import pickle
import re
import struct
import tempfile
import zipfile
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from ..errors import PaddleMIXError

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

PathLike = Union[str, "os.PathLike[str]"]

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

# The safetensors reference implementation refuses headers above 100 MB; so do we, so a
# corrupt length field cannot make us allocate gigabytes.
_MAX_SAFETENSORS_HEADER = 100_000_000
_MAX_INDEX_BYTES = 64 * 1024 * 1024
_MAX_COMPRESSED_RECORD = 256 * 1024 * 1024

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

# Numeric kinds a state dict entry may have; object, string and structured arrays are not weights.
_TENSOR_KINDS = "biuf"


class CheckpointError(PaddleMIXError, ValueError):
    """A weights file that cannot be read safely: corrupt, truncated, unsupported or malicious."""


def _error(path: Any, problem: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path) if isinstance(path, os.PathLike) else path}: {problem}")


@contextlib.contextmanager
def _parse_errors_as(path: Any, what: str) -> Iterator[None]:
    """Turn any exception from parsing untrusted bytes into a CheckpointError.

    Parsers of corrupt input fail in many ways (struct.error, zipfile.BadZipFile,
    UnicodeDecodeError, numpy's ValueError, MemoryError for absurd sizes, ...); callers should
    see one exception type that names the file, not the parser's internals.
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - rethrown as CheckpointError with the cause attached
        raise _error(path, f"corrupt or unreadable {what} ({type(e).__name__}: {e})") from e


def _map_file(path: PathLike) -> mmap.mmap:
    """Map a file read-only; the mapping outlives the descriptor and any array viewing it."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise _error(path, "file is empty")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise _error(path, f"cannot read file ({e.strerror or e})") from e


def _with_byte_order(dtype: np.dtype, order: str) -> np.dtype:
    """``dtype`` in byte order ``order`` ("<" or ">"), canonical so native types print plainly."""
    return np.dtype(order + dtype.str[1:]) if dtype.itemsize > 1 else dtype


def _bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is exact: shift the bits up."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class LazyArray:
    """An array computed from other arrays only when it is read (``np.asarray``).

    Decoding a checkpoint tensor (bfloat16 widening, byte swaps, strided copies) and moving
    it into the model's layout (transposes, q/k/v fusion) each make a copy; done eagerly for
    a whole checkpoint that is a second full copy of the model in host memory. Deferred, the
    copies exist for one tensor at a time, while the loader holds it. ``shape`` is known for
    decoded file tensors and None for layout conversions; ``dtype`` is the result's.
    """

    __slots__ = ("_fn", "_sources", "_into", "shape", "dtype")

    def __init__(
        self, fn: Callable[..., np.ndarray], *sources: Any, shape: Optional[Tuple[int, ...]] = None,
        dtype: Any = None, into: Optional[Callable[..., Any]] = None,
    ) -> None:
        self._fn = fn
        self._sources = sources
        self._into = into  # into(out, *arrays) writes fn(*arrays) into out; saves a copy in write()
        self.shape = shape
        self.dtype = np.dtype(dtype) if dtype is not None else sources[0].dtype

    @property
    def ndim(self) -> int:
        if self.shape is None:
            raise TypeError("the shape of this LazyArray is known only once it is read (np.asarray)")
        return len(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self._fn(*(np.asarray(source) for source in self._sources))
        return array if dtype is None else array.astype(dtype, copy=False)

    def write(self, out: np.ndarray) -> None:
        """Write the value into ``out`` (its shape, any dtype: values are cast as ``astype`` does)."""
        arrays = [np.asarray(source) for source in self._sources]
        if self._into is not None:
            self._into(out, *arrays)
        else:
            np.copyto(out, self._fn(*arrays), casting="unsafe")

    def release(self) -> None:
        for source in self._sources:
            release(source)

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"


def _byte_bounds(array: np.ndarray) -> Tuple[int, int]:
    byte_bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds  # numpy 1.x / 2.x
    return byte_bounds(array)


def release(value: Any) -> None:
    """Drop the file pages behind a memory-mapped tensor from this process's resident memory.

    Reading a mapped tensor leaves its pages mapped, and counted in the process's RSS, until
    the whole file is unmapped; a loader that copied a tensor into the model releases it so a
    checkpoint bigger than memory never becomes resident all at once. The data stays valid:
    the kernel maps the pages in again (from its page cache) if the tensor is read again.
    Arrays that are not views of a mapped file are left alone.
    """
    if isinstance(value, LazyArray):
        value.release()
        return
    if not isinstance(value, np.ndarray) or value.size == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base: Any = value
    while isinstance(base, np.ndarray):
        base = base.base
    if not (isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)) or base.obj.closed:
        return
    mapped = base.obj
    origin = np.frombuffer(base, dtype=np.uint8, count=0).__array_interface__["data"][0]
    low, high = _byte_bounds(value)
    start = (low - origin) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(high - origin, len(mapped))
    if 0 <= start < end:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the raw uint16 bits.

    numpy has no bfloat16 type; pass the result to :func:`save_safetensors` with its name
    in ``bfloat16`` to store a BF16 tensor.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    # A NaN must stay a NaN even when rounding would carry its payload into the exponent.
    is_nan = np.isnan(bits.view(np.float32))
    return np.where(is_nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)


# --------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------


class _TensorEntry(NamedTuple):
    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int
    end: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        raise _error(path, f"safetensors file is {size} bytes, shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", mm[:8])
    if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
        raise _error(
            path,
            f"safetensors header length {header_len} does not fit the file ({size} bytes); "
            "the file is truncated or not safetensors",
        )
    data_start = 8 + header_len
    try:
        header = json.loads(bytes(mm[8:data_start]).decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _error(path, f"safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _error(path, f"safetensors header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _error(path, "safetensors __metadata__ must map strings to strings")

    data_size = size - data_start
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _error(path, f"tensor {name!r}: header entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise _error(
                path, f"tensor {name!r}: unsupported dtype {dtype!r} (supported: {', '.join(_SAFETENSORS_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _error(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _error(path, f"tensor {name!r}: data_offsets {offsets!r} is not a pair of integers")
        start, end = offsets
        if not 0 <= start <= end <= data_size:
            raise _error(
                path, f"tensor {name!r}: data_offsets [{start}, {end}] fall outside the data region of {data_size} bytes"
            )
        expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if expected != end - start:
            raise _error(
                path, f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, data_offsets give {end - start}"
            )
        entries.append(_TensorEntry(name, dtype, tuple(shape), start, end))

    previous: Optional[_TensorEntry] = None
    for entry in sorted((e for e in entries if e.end > e.start), key=lambda e: e.start):
        if previous is not None and entry.start < previous.end:
            raise _error(path, f"tensors {previous.name!r} and {entry.name!r} overlap in the data region")
        previous = entry
    return entries, metadata, data_start


def _load_safetensors(path: PathLike) -> Dict[str, np.ndarray]:
    mm = _map_file(path)
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
            array = LazyArray(_bf16_bits_to_float32, array, shape=entry.shape, dtype=np.float32)
        elif entry.dtype == "BOOL":
            array = LazyArray(np.not_equal, array, np.uint8(0), shape=entry.shape, dtype=np.bool_)
        tensors[entry.name] = array
    return tensors


def safetensors_metadata(path: PathLike) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if it has none), header validated."""
    mm = _map_file(path)
    try:
        return _read_safetensors_header(path, mm)[1]
    finally:
        mm.close()


# --------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------


# Protocol 2 pickles written by Python 3 use Python 2 module names for builtins.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _container_globals(path: PathLike) -> Dict[Tuple[str, str], Any]:
    """Globals plain containers need in any pickle.

    Each load gets fresh callables: a pickle can BUILD attributes onto any object it can
    name, and must not be able to change a function the next load will use.
    """

    def latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
        # Protocol 2 has no bytes opcode: Python 3 pickles bytes as _codecs.encode(str, "latin1").
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise _error(path, f"_codecs.encode is only allowed for latin1 bytes, got encoding {encoding!r}")
        return text.encode("latin1")

    return {("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): latin1_bytes}


class _ArrayHandle:
    """An array built during unpickling, sealed against the pickle.

    Returning a bare ndarray would let a later BUILD opcode call its __setstate__ or set its
    shape/strides; a handle refuses BUILD, and the arrays are taken out only after the
    pickle has finished (see _materialize).
    """

    __slots__ = ("path", "array")

    def __init__(self, path: PathLike, array: Optional[np.ndarray] = None) -> None:
        self.path = path
        self.array = array

    def __setstate__(self, state: Any) -> None:
        raise _error(self.path, "pickle tries to modify a tensor after creating it")


def _materialize(path: PathLike, obj: Any, paddle_pairs: bool = False) -> Any:
    """Replace array handles by their arrays throughout dicts, lists and tuples.

    Shared containers are converted once (a pickle can reference one list from many places,
    which walked naively is exponential), cycles and absurd nesting are refused.
    ``paddle_pairs``: Paddle pickles tensors outside a flat state dict as (name, array).
    """
    done: Dict[int, Any] = {}
    in_progress = set()

    def convert(value: Any, depth: int) -> Any:
        if isinstance(value, _ArrayHandle):
            if value.array is None:
                raise _error(path, "pickle creates an array but never gives it data")
            return value.array
        if not isinstance(value, (dict, list, tuple)):
            return value
        key = id(value)
        if key in done:
            return done[key]
        if key in in_progress or depth > 100:
            raise _error(path, "pickle has self-referencing or too deeply nested containers")
        in_progress.add(key)
        if isinstance(value, dict):
            result: Any = {k: convert(v, depth + 1) for k, v in value.items()}
        elif isinstance(value, list):
            result = [convert(v, depth + 1) for v in value]
        else:
            result = tuple(convert(v, depth + 1) for v in value)
            if paddle_pairs and len(result) == 2 and isinstance(result[0], str) and isinstance(result[1], np.ndarray):
                result = result[1]
        in_progress.discard(key)
        done[key] = result
        return result

    return convert(obj, 0)


class _RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler, on purpose
    """Resolves globals only from an explicit table; anything else is refused by name.

    Built on the pure-Python unpickler: its memo is a dict, while the C unpickler sizes an
    array by the largest memo index, so a 10-byte pickle with index 2**28 costs it 4 GB.
    """

    def _load_bytearray8(self) -> None:
        # The stock handler allocates (and zero-fills) the declared length before reading, so
        # a forged length costs that much memory; read first, then check the length.
        (length,) = struct.unpack("<Q", self.read(8))
        data = self.read(length)
        if len(data) != length:
            raise _error(self._path, "pickle data was truncated")
        self.append(bytearray(data))

    dispatch = dict(pickle._Unpickler.dispatch)  # noqa: SLF001
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def __init__(
        self,
        file: Any,
        path: PathLike,
        allowed: Mapping[Tuple[str, str], Any],
        persistent_load: Optional[Callable[[Any], Any]] = None,
    ) -> None:
        super().__init__(file)
        self._path = path
        self._allowed = allowed
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _error(
                self._path,
                f"refused to load global '{module}.{name}': a weights file needs only tensors and "
                "plain containers, and loading anything else could run code. If you trust this file, "
                "convert it to safetensors (e.g. with open_clip or safetensors.torch.save_file) and load that.",
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise _error(self._path, "pickle refers to external storage, which this format does not have")
        return self._persistent_load(pid)


def _unpickle(
    data: Any,
    path: PathLike,
    allowed: Mapping[Tuple[str, str], Any],
    persistent_load: Optional[Callable[[Any], Any]] = None,
) -> Any:
    stream = data if hasattr(data, "read") else io.BytesIO(data)  # mmap objects have read/readline
    with _parse_errors_as(path, "pickle"):
        return _RestrictedUnpickler(stream, path, allowed, persistent_load).load()


# --------------------------------------------------------------------------------------
# torch pickles
# --------------------------------------------------------------------------------------


class _ElementType(NamedTuple):
    """How one torch element type is stored: numpy dtype of the raw bytes, and a decoder."""

    torch_name: str
    raw: np.dtype
    kind: str = "plain"  # "plain", "bf16" or "bool"


_TORCH_ELEMENT_TYPES: Dict[str, _ElementType] = {
    t.torch_name: t
    for t in (
        _ElementType("float64", np.dtype("f8")),
        _ElementType("float32", np.dtype("f4")),
        _ElementType("float16", np.dtype("f2")),
        _ElementType("bfloat16", np.dtype("u2"), "bf16"),
        _ElementType("int64", np.dtype("i8")),
        _ElementType("int32", np.dtype("i4")),
        _ElementType("int16", np.dtype("i2")),
        _ElementType("int8", np.dtype("i1")),
        _ElementType("uint8", np.dtype("u1")),
        _ElementType("bool", np.dtype("u1"), "bool"),
        _ElementType("uint16", np.dtype("u2")),
        _ElementType("uint32", np.dtype("u4")),
        _ElementType("uint64", np.dtype("u8")),
    )
}
# The typed storage classes torch pickles for each element type.
_TORCH_STORAGE_CLASSES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
# Names of torch dtype objects (``torch.float32``...); they unpickle to inert markers, so a
# dict that merely mentions a dtype loads, while a tensor of an unsupported one is refused.
_TORCH_DTYPE_NAME = re.compile(r"(b?float|u?int|complex|q?u?int|bool|bits)[0-9a-z_]*")

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001


class _StorageType(NamedTuple):
    """Stand-in for ``torch.FloatStorage`` etc.; element None means untyped bytes."""

    name: str
    element: Optional[_ElementType]


class _TorchDtype(NamedTuple):
    name: str


class _TorchClass(NamedTuple):
    """Stand-in for ``torch.Tensor``/``Parameter`` as passed to ``_rebuild_from_type_v2``."""

    name: str


class _Storage(NamedTuple):
    """A storage's bytes viewed as its element type; data None during a dry run."""

    key: str
    element: Optional[_ElementType]
    data: Optional[np.ndarray]
    order: str  # "<" or ">": the byte order the file was written in


class _TorchUnpickling:
    """The globals a torch state-dict pickle may use, bound to one file's storages.

    ``storage_data(key, storage_type, numel)`` returns the storage's bytes as a 1-D array of
    its element type (uint8 for untyped storages), or None for a dry run that only collects
    which storages exist.
    """

    def __init__(
        self,
        path: PathLike,
        storage_data: Callable[[str, _StorageType, int], Optional[np.ndarray]],
        order: str = "<",
        legacy: bool = False,
    ) -> None:
        self._path = path
        self._storage_data = storage_data
        self._order = order
        self._legacy = legacy
        self._storages: Dict[str, _Storage] = {}
        self._tensor_builders = (self._rebuild_tensor, self._rebuild_tensor_v2, self._rebuild_tensor_v3)
        self.allowed: Dict[Tuple[str, str], Any] = {
            **_container_globals(path),
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
            ("torch", "Tensor"): _TorchClass("torch.Tensor"),
            ("torch.nn.parameter", "Parameter"): _TorchClass("torch.nn.parameter.Parameter"),
            ("torch", "Size"): tuple,
            ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None),
            ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
        }
        for class_name, element in _TORCH_STORAGE_CLASSES.items():
            self.allowed[("torch", class_name)] = _StorageType(class_name, _TORCH_ELEMENT_TYPES[element])

    def unpickler_table(self) -> "_TorchGlobals":
        return _TorchGlobals(self)

    # -- persistent ids -----------------------------------------------------------------

    def persistent_load(self, pid: Any) -> _Storage:
        # zip format: ('storage', type, key, location, numel)
        # legacy format: the same plus view_metadata, which is None except in pre-1.0 files.
        expected_len = 6 if self._legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == expected_len and pid[0] == "storage"):
            raise _error(self._path, f"unsupported persistent id {str(pid)[:100]!r}; expected a tensor storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if self._legacy and pid[5] is not None:
            raise _error(self._path, "storage views from pre-1.0 torch files are not supported")
        if not isinstance(storage_type, _StorageType):
            raise _error(self._path, f"storage type {storage_type!r} is not a torch storage class")
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise _error(self._path, f"malformed storage reference (key {key!r}, numel {numel!r})")
        storage = self._storages.get(key)
        if storage is None:
            storage = _Storage(key, storage_type.element, self._storage_data(key, storage_type, numel), self._order)
            self._storages[key] = storage
        elif storage.element != storage_type.element:
            raise _error(self._path, f"storage {key!r} is used with two different element types")
        return storage

    # -- tensor reconstruction ----------------------------------------------------------

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> Optional[_ArrayHandle]:
        return self._tensor(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v2(
        self, storage: Any, storage_offset: Any, size: Any, stride: Any, *unused: Any
    ) -> Optional[_ArrayHandle]:
        # unused: requires_grad, backward_hooks, metadata (autograd and conj/neg bits).
        return self._tensor(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v3(
        self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
        *unused: Any,
    ) -> Optional[_ArrayHandle]:
        # torch uses v3 for element types without a typed storage class (uint16/32/64,
        # float8): the storage is untyped bytes and the dtype comes separately.
        if not isinstance(dtype, _TorchDtype):
            raise _error(self._path, f"tensor dtype {dtype!r} is not a torch dtype")
        return self._tensor(storage, storage_offset, size, stride, dtype)

    def _rebuild_parameter(self, data: Any, *unused: Any) -> Any:
        # unused: requires_grad, hooks and (for _rebuild_parameter_with_state) Python attributes.
        if data is not None and not isinstance(data, _ArrayHandle):
            raise _error(self._path, f"parameter data is {type(data).__name__}, not a tensor")
        return data

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        # torch wraps tensors that carry Python attributes this way; the attributes are dropped.
        if func not in self._tensor_builders or not isinstance(new_type, _TorchClass) or not isinstance(args, tuple):
            raise _error(self._path, "unsupported tensor subclass reconstruction")
        return func(*args)

    def _tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, dtype: Optional[_TorchDtype]
    ) -> Optional[_ArrayHandle]:
        if not isinstance(storage, _Storage):
            raise _error(self._path, "tensor is not backed by a storage record")
        if not (
            _is_int(offset)
            and offset >= 0
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(_is_int(v) and v >= 0 for v in size + stride)
        ):
            raise _error(self._path, f"malformed tensor geometry (offset {offset!r}, size {size!r}, stride {stride!r})")
        element = storage.element
        if dtype is not None:
            element = _TORCH_ELEMENT_TYPES.get(dtype.name)
            if element is None:
                raise _error(self._path, f"tensor dtype torch.{dtype.name} is not supported (no numpy equivalent)")
            if storage.element is not None and storage.element != element:
                raise _error(self._path, f"tensor dtype torch.{dtype.name} does not match its storage")
        if element is None:
            raise _error(self._path, "tensor over an untyped storage has no dtype")
        if storage.data is None:  # dry run
            return None

        data = storage.data
        if storage.element is None:  # untyped bytes: reinterpret as the tensor's element type
            raw = _with_byte_order(element.raw, storage.order)
            if data.size % raw.itemsize:
                raise _error(self._path, f"storage {storage.key!r} of {data.size} bytes does not hold whole {element.torch_name}")
            data = data.view(raw)
        numel = math.prod(size)
        if numel == 0:
            return _ArrayHandle(self._path, _decode_torch(np.empty(size, dtype=data.dtype), element))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size or numel > data.size:
            raise _error(
                self._path,
                f"tensor of size {list(size)} (offset {offset}, stride {list(stride)}) does not fit its "
                f"storage {storage.key!r} of {data.size} elements",
            )
        contiguous = all(n == 1 or s == math.prod(size[i + 1:]) for i, (n, s) in enumerate(zip(size, stride)))
        if contiguous:
            view = data[offset:offset + numel].reshape(size)
            if view.dtype.isnative and element.kind == "plain":
                return _ArrayHandle(self._path, view)  # the file's bytes, untouched until read
            return _ArrayHandle(
                self._path, LazyArray(lambda v: _decode_torch(v, element), view, shape=size, dtype=_decoded_dtype(element))
            )

        def gather(storage_data: np.ndarray) -> np.ndarray:
            itemsize = storage_data.dtype.itemsize
            strided = np.lib.stride_tricks.as_strided(
                storage_data[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
            )
            return _decode_torch(np.ascontiguousarray(strided), element)

        return _ArrayHandle(self._path, LazyArray(gather, data, shape=size, dtype=_decoded_dtype(element)))


def _decoded_dtype(element: _ElementType) -> np.dtype:
    return {"bf16": np.dtype(np.float32), "bool": np.dtype(np.bool_)}.get(element.kind, element.raw)


def _decode_torch(array: np.ndarray, element: _ElementType) -> np.ndarray:
    """Raw storage elements -> the numpy array they mean (native order, bf16 widened, 0/1 bools)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("=").str)
    if element.kind == "bf16":
        return _bf16_bits_to_float32(array)
    if element.kind == "bool":
        return array != 0
    return array


class _TorchGlobals(dict):
    """The allowed-globals table of a torch pickle, with torch dtype names resolved lazily."""

    def __init__(self, unpickling: _TorchUnpickling) -> None:
        super().__init__(unpickling.allowed)
        self._path = unpickling._path

    def __missing__(self, key: Tuple[str, str]) -> Any:
        module, name = key
        if module == "torch" and name.endswith("Storage"):
            raise _error(self._path, f"tensors of type torch.{name} are not supported (no numpy equivalent)")
        if module == "torch" and _TORCH_DTYPE_NAME.fullmatch(name):
            return _TorchDtype(name)
        raise KeyError(key)


_TORCHSCRIPT_HINT = (
    "TorchScript archives (such as OpenAI's original ViT-*.pt) hold code as well as weights and are not "
    "supported; load the model once with open_clip and save its state_dict as safetensors "
    "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')), then load that."
)


def _zip_record(path: PathLike, zf: zipfile.ZipFile, mm: mmap.mmap, name: str) -> np.ndarray:
    """A zip member as a uint8 array; stored (uncompressed) members are views of the file."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise _error(path, f"archive has no record {name!r}") from None
    if info.flag_bits & 0x1:
        raise _error(path, f"record {name!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        # Not what torch writes, but a re-zipped archive may have it. zipfile stops at the
        # declared size and checks the CRC; the cap keeps a zip bomb from filling memory.
        if info.file_size > _MAX_COMPRESSED_RECORD:
            raise _error(
                path,
                f"record {name!r} is compressed and {info.file_size} bytes; torch writes records uncompressed, "
                f"compressed ones are accepted only up to {_MAX_COMPRESSED_RECORD} bytes. Re-save the checkpoint "
                "with torch.save or as safetensors.",
            )
        return np.frombuffer(zf.read(name), dtype=np.uint8)
    offset = info.header_offset
    local_header = mm[offset:offset + 30]
    if len(local_header) != 30 or local_header[:4] != b"PK\x03\x04":
        raise _error(path, f"record {name!r} has a bad local header")
    name_len, extra_len = struct.unpack("<HH", local_header[26:30])
    start = offset + 30 + name_len + extra_len
    if info.compress_size != info.file_size or start + info.file_size > len(mm):
        raise _error(path, f"record {name!r} runs past the end of the file (truncated download?)")
    if info.file_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(mm, dtype=np.uint8, count=info.file_size, offset=start)


def _load_torch_zip(path: PathLike) -> Any:
    mm = _map_file(path)
    with _parse_errors_as(path, "zip archive"), open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        names = zf.namelist()
        prefixes = sorted({n.split("/", 1)[0] for n in names if n.count("/") == 1 and n.endswith("/data.pkl")})
        if any(n.split("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in names):
            raise _error(path, _TORCHSCRIPT_HINT)
        if len(prefixes) != 1:
            raise _error(
                path,
                f"zip archive has {len(prefixes)} '<name>/data.pkl' records, a torch checkpoint has exactly one "
                f"(first entries: {names[:5]})",
            )
        prefix = prefixes[0]
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = bytes(_zip_record(path, zf, mm, f"{prefix}/byteorder")).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise _error(path, f"unknown byteorder record {byteorder!r}")
        order = "<" if byteorder == "little" else ">"

        def storage_data(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
            raw = _zip_record(path, zf, mm, f"{prefix}/data/{key}")
            element_dtype = np.dtype("u1") if storage_type.element is None else storage_type.element.raw
            if raw.size != numel * element_dtype.itemsize:
                raise _error(
                    path,
                    f"storage record {key!r} has {raw.size} bytes, expected {numel} x {element_dtype.itemsize}",
                )
            return raw.view(_with_byte_order(element_dtype, order))

        unpickling = _TorchUnpickling(path, storage_data, order)
        pickled = bytes(_zip_record(path, zf, mm, f"{prefix}/data.pkl"))
        return _materialize(path, _unpickle(pickled, path, unpickling.unpickler_table(), unpickling.persistent_load))


def _load_torch_legacy(path: PathLike) -> Any:
    """Pre-1.6 torch files: magic, protocol and sys-info pickles, the main pickle, a pickle of
    storage keys, then each storage's element count (u64) and bytes in key order.

    The main pickle is read twice: a dry run learns each storage's element type, which is
    needed to find where each storage's bytes start, then the real run builds the arrays.
    """
    mm = _map_file(path)
    stream = mm
    with _parse_errors_as(path, "legacy torch file"):
        if _unpickle(stream, path, {}) != _TORCH_LEGACY_MAGIC:
            raise _error(path, "not a torch file (bad magic number)")
        if _unpickle(stream, path, {}) != _TORCH_LEGACY_PROTOCOL:
            raise _error(path, "unsupported legacy torch protocol version")
        sys_info = _unpickle(stream, path, {})
        if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian"), bool):
            raise _error(path, "legacy torch file has malformed system info")
        order = "<" if sys_info["little_endian"] else ">"
        main_start = stream.tell()

        dry = _TorchUnpickling(path, lambda key, storage_type, numel: None, order, legacy=True)
        _unpickle(stream, path, dry.unpickler_table(), dry.persistent_load)
        keys = _unpickle(stream, path, {})
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _error(path, "legacy torch file has a malformed storage key list")
        offsets: Dict[str, Tuple[int, int]] = {}
        position = stream.tell()
        for key in keys:
            storage = dry._storages.get(key)
            if storage is None or storage.element is None:
                raise _error(path, f"storage {key!r} is listed but not used by any tensor")
            if position + 8 > len(mm):
                raise _error(path, "file ends inside the storage data (truncated download?)")
            (numel,) = struct.unpack("<Q" if order == "<" else ">Q", mm[position:position + 8])
            nbytes = numel * storage.element.raw.itemsize
            if position + 8 + nbytes > len(mm):
                raise _error(path, "file ends inside the storage data (truncated download?)")
            offsets[key] = (position + 8, numel)
            position += 8 + nbytes

        def storage_data(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
            if key not in offsets:
                raise _error(path, f"storage {key!r} has no data")
            start, stored_numel = offsets[key]
            if stored_numel != numel:
                raise _error(path, f"storage {key!r} holds {stored_numel} elements, the pickle expects {numel}")
            dtype = _with_byte_order(storage_type.element.raw, order)
            if numel == 0:
                return np.empty(0, dtype=dtype)
            return np.frombuffer(mm, dtype=dtype, count=numel, offset=start)

        stream.seek(main_start)
        real = _TorchUnpickling(path, storage_data, order, legacy=True)
        return _materialize(path, _unpickle(stream, path, real.unpickler_table(), real.persistent_load))


# --------------------------------------------------------------------------------------
# Paddle .pdparams (pickled numpy arrays)
# --------------------------------------------------------------------------------------

_NUMPY_DTYPE_SPEC = re.compile(r"[<>|=]?[biuf?][0-9]*")
_PADDLE_BIG_PARAMS_KEY = "UnpackBigParamInfor@@"


class _NumpyClass(NamedTuple):
    name: str


_NDARRAY = _NumpyClass("numpy.ndarray")


class _PickledDtype:
    """Stand-in for a pickled numpy.dtype: a plain numeric type plus the byte order from BUILD.

    numpy's own dtype.__setstate__ trusts the pickle with the type's flags and fields; a
    forged state can mark float32 as holding object pointers. Here only the byte order is taken.
    """

    __slots__ = ("path", "dtype")

    def __init__(self, path: PathLike, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (
            isinstance(state, tuple)
            and len(state) in (8, 9)
            and state[1] in ("<", ">", "|", "=")
            and state[2:5] == (None, None, None)
        ):
            raise _error(self.path, f"unsupported numpy dtype state {str(state)[:80]}")
        if state[1] in "<>":
            self.dtype = _with_byte_order(self.dtype, state[1])


class _PickledArray(_ArrayHandle):
    """Stand-in for a pickled ndarray: BUILD gives (version, shape, dtype, fortran, bytes) once."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise _error(self.path, "pickle sets an array's data twice")
        if isinstance(state, tuple) and len(state) == 4:  # version 0 had no version field
            state = (0,) + state
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _error(self.path, "malformed numpy array state")
        _, shape, dtype, fortran, data = state
        if not (
            isinstance(shape, tuple)
            and all(_is_int(n) and n >= 0 for n in shape)
            and isinstance(dtype, _PickledDtype)
            and isinstance(fortran, bool)
            and isinstance(data, (bytes, bytearray))
        ):
            raise _error(self.path, "malformed numpy array state")
        count = math.prod(shape)
        if len(data) != count * dtype.dtype.itemsize:
            raise _error(
                self.path, f"numpy array of shape {list(shape)} and dtype {dtype.dtype} has {len(data)} bytes of data"
            )
        array = np.frombuffer(data, dtype=dtype.dtype, count=count) if count else np.empty(0, dtype=dtype.dtype)
        array = array.reshape(shape, order="F" if fortran else "C")
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("=").str)
        if array.dtype.kind == "b":
            array = array.view(np.uint8) != 0  # any byte but 0 is True, as numpy reads it
        self.array = array


def _numpy_globals(path: PathLike) -> Dict[Tuple[str, str], Any]:
    """Stand-ins for the numpy globals an array pickle uses; each checks its arguments."""

    def reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PickledArray:
        if subtype is not _NDARRAY:
            raise _error(path, f"array subclass {subtype!r} is not allowed")
        return _PickledArray(path)

    def dtype(spec: Any, align: Any = False, copy: Any = False) -> _PickledDtype:
        if not isinstance(spec, str) or not _NUMPY_DTYPE_SPEC.fullmatch(spec):
            raise _error(path, f"numpy dtype {spec!r} is not a numeric dtype")
        return _PickledDtype(path, np.dtype(spec))

    def scalar(dtype_: Any, data: Any) -> Any:
        if not isinstance(dtype_, _PickledDtype) or not isinstance(data, bytes):
            raise _error(path, "malformed numpy scalar")
        return np.frombuffer(data, dtype=dtype_.dtype, count=1)[0]

    table: Dict[Tuple[str, str], Any] = {
        **_container_globals(path),
        ("builtins", "tuple"): tuple,  # paddle.save pickles a Tensor outside a state dict as (tuple, (name, array))
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x writers
        table[(module, "_reconstruct")] = reconstruct
        table[(module, "scalar")] = scalar
    return table


def _join_paddle_big_params(path: PathLike, obj: Any) -> Any:
    """paddle.save with protocol 2/3 splits arrays over 1 GiB into flat slices plus a table."""
    if not isinstance(obj, dict) or _PADDLE_BIG_PARAMS_KEY not in obj:
        return obj
    obj = dict(obj)
    table = obj.pop(_PADDLE_BIG_PARAMS_KEY)
    if not isinstance(table, dict):
        raise _error(path, f"malformed {_PADDLE_BIG_PARAMS_KEY} table")
    for name, info in table.items():
        try:
            slices = [obj.pop(part) for part in info["slices"]]
            shape = tuple(info["OriginShape"])
            if not all(isinstance(s, np.ndarray) and s.ndim == 1 for s in slices):
                raise TypeError("slices are not flat arrays")
            joined = np.concatenate(slices)
            obj[name] = joined.reshape(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise _error(path, f"cannot rejoin split parameter {name!r} ({type(e).__name__}: {e})") from e
    return obj


def _load_numpy_pickle(path: PathLike) -> Any:
    obj = _materialize(path, _unpickle(_map_file(path), path, _numpy_globals(path)), paddle_pairs=True)
    with _parse_errors_as(path, "Paddle state dict"):
        return _join_paddle_big_params(path, obj)


# --------------------------------------------------------------------------------------
# Format detection, unwrapping, sharded checkpoints
# --------------------------------------------------------------------------------------


def _sniff(path: PathLike) -> str:
    """Name the format from the file's first bytes; the suffix is only used in messages."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise _error(path, f"cannot read file ({e.strerror or e})") from e
    if not head:
        raise _error(path, "file is empty")
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if os.fspath(path).endswith(".safetensors"):
        return "safetensors"  # damaged header: let the parser say what is wrong with it
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        magic = b"\x8a\x0a" + _TORCH_LEGACY_MAGIC.to_bytes(10, "little")
        # Protocol 4+ pickles may start with a 9-byte FRAME opcode.
        if head[2:14] == magic or (head[2:3] == b"\x95" and head[11:23] == magic):
            return "torch-legacy"
        return "pickle"
    if head[257:262] == b"ustar":
        raise _error(
            path,
            "this is a tar-format torch checkpoint from before PyTorch 1.0, which is not supported; re-save it "
            "with a recent torch as safetensors (safetensors.torch.save_file) and load that",
        )
    if head.startswith(b"version https://git-lfs"):
        raise _error(path, "this is a Git LFS pointer, not the weights; fetch the real file with `git lfs pull`")
    if head.lstrip()[:1] == b"{":
        return "index"
    raise _error(
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
        raise _error(directory, f"cannot list directory ({e.strerror or e})") from e
    raise _error(
        directory,
        f"no weights file found; looked for {', '.join(CHECKPOINT_FILE_NAMES)}; "
        f"the directory has {present[:30] if present else 'no files'}",
    )


def _resolve(path: PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return find_checkpoint_file(path)
    if not os.path.exists(path):
        raise _error(path, "no such file or directory")
    return path


def _load_object(path: str, fmt: str) -> Any:
    if fmt == "safetensors":
        with _parse_errors_as(path, "safetensors file"):
            return _load_safetensors(path)
    if fmt == "torch-zip":
        return _load_torch_zip(path)
    if fmt == "torch-legacy":
        return _load_torch_legacy(path)
    if fmt == "pickle":
        return _load_numpy_pickle(path)
    raise _error(path, f"a shard must be a weights file, not {fmt}")


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
    with _parse_errors_as(path, "index JSON"):
        if os.path.getsize(path) > _MAX_INDEX_BYTES:
            raise _error(path, f"index file is larger than {_MAX_INDEX_BYTES} bytes")
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _error(path, "index JSON has no 'weight_map' object mapping tensor names to shard files")
    shards: Dict[str, List[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise _error(path, f"weight_map entry {name!r} -> {shard!r} is not a file name")
        normalised = os.path.normpath(shard)
        if os.path.isabs(shard) or normalised.split(os.sep)[0] == "..":
            raise _error(path, f"shard {shard!r} is outside the index's directory")
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
            raise _error(path, f"shard {shard!r} listed in the index does not exist")
        tensors = unwrap_state_dict(_load_object(shard_path, _sniff(shard_path)), source=shard_path, strip_prefix=False)
        missing = [name for name in names if name not in tensors]
        if missing:
            raise _error(shard_path, f"the index places {missing[:10]} in this shard, but it does not contain them")
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
            raise _error(path, f"tensors {sorted(duplicates)[:10]} appear in more than one shard")
        merged.update((name, np.asarray(value)) for name, value in shard.items())
    return merged


# --------------------------------------------------------------------------------------
# Writing safetensors
# --------------------------------------------------------------------------------------


class _Planned(NamedTuple):
    name: str
    value: Any  # np.ndarray or LazyArray (read only when written)
    shape: Tuple[int, ...]
    dtype: np.dtype  # as stored (little-endian)


def _safetensors_payload(
    path: PathLike, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]], bfloat16: Collection[str]
) -> Tuple[bytes, List[_Planned]]:
    """The header, from names, shapes and dtypes alone, and the tensors in the order it places them."""
    header: Dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise _error(path, "safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    unknown_bf16 = set(bfloat16) - set(tensors)
    if unknown_bf16:
        raise _error(path, f"bfloat16 names {sorted(unknown_bf16)} are not among the tensors")
    planned = []
    offset = 0
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise _error(path, f"invalid tensor name {name!r}")
        if isinstance(value, LazyArray):
            if value.shape is None:
                raise _error(path, f"tensor {name!r} is a LazyArray of unknown shape; give its shape to write it")
        else:
            value = np.asarray(value)
        dtype = value.dtype
        native = dtype.newbyteorder("=")
        if name in bfloat16:
            if dtype != np.uint16:
                raise _error(path, f"bfloat16 tensor {name!r} must be given as uint16 bits (see to_bfloat16_bits), got {dtype}")
            code = "BF16"
        elif native in _NUMPY_TO_SAFETENSORS:
            code = _NUMPY_TO_SAFETENSORS[native]
        else:
            raise _error(
                path,
                f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; supported: "
                f"{', '.join(str(d) for d in _NUMPY_TO_SAFETENSORS)}",
            )
        shape = tuple(int(d) for d in value.shape)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        planned.append(_Planned(name, value, shape, dtype.newbyteorder("<")))
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep the data region 8-byte aligned for mmap readers
    return blob, planned


def _write_planned(path: PathLike, f: Any, tensor: _Planned) -> None:
    """Read one tensor, check it is what the header promised, write it, let its pages go."""
    array = np.asarray(tensor.value)
    if tuple(array.shape) != tensor.shape or array.dtype.newbyteorder("<") != tensor.dtype:
        raise _error(path, f"tensor {tensor.name!r} came out as {array.dtype} {list(array.shape)}, "
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
    converted multi-GB checkpoint never exists in memory as a whole.

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
        raise _error(path, f"cannot create a file in {directory} ({e.strerror or e})") from e
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
        raise _error(path, f"cannot write file ({e.strerror or e})") from e
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


# --------------------------------------------------------------------------------------
# Pickles of plain arrays (datasets such as the CIFAR python release)
# --------------------------------------------------------------------------------------


class _Python2Array(_PickledArray):
    """An array from a Python 2 pickle read as latin1: its data arrives as text, mapped back to the same bytes."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state and isinstance(state[-1], str):
            state = state[:-1] + (state[-1].encode("latin1"),)
        super().__setstate__(state)


def load_array_pickle(path: PathLike, python2: bool = False) -> Any:
    """Dicts, lists and numpy arrays from a pickle, read by the same restricted unpickler (and with
    the same :class:`CheckpointError`) as ``.pdparams`` weights; no other global is resolved.

    ``python2``: the file may come from Python 2 (the CIFAR python release does); its byte strings
    are read as latin1 text, the encoding numpy documents for such pickles of arrays.
    """
    table = _numpy_globals(path)
    if python2:
        validate = table[("numpy", "ndarray")]

        def reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PickledArray:
            if subtype is not validate:
                raise _error(path, f"array subclass {subtype!r} is not allowed")
            return _Python2Array(path)

        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            table[(module, "_reconstruct")] = reconstruct
    unpickler = _RestrictedUnpickler(_map_file(path), path, table)
    if python2:
        unpickler.encoding = "latin1"
    with _parse_errors_as(path, "pickle"):
        obj = unpickler.load()
    return _materialize(path, obj)
