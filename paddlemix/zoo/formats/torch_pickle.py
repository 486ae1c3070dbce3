"""torch checkpoints (``.bin``/``.pt``/``.pth``) read without torch and without running their code.

Two layouts: the zip archive torch has written since 1.6, and the older "legacy" stream of
pickles. Both pickles go through :mod:`.safe_pickle` with a table that knows only the globals a
state dict needs (tensor rebuild functions, storage classes, dtype names), each an inert stand-in
bound to this file's storages. Stored (uncompressed) records are views of the mapped file; a
tensor that needs decoding (bfloat16, big-endian, strided) becomes a :class:`LazyArray`.
Refused, with advice: TorchScript archives, tar files from before torch 1.0, storage views,
element types numpy lacks (complex, float8, quantized) and tensor subclasses.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
import zipfile
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np

from .common import PathLike, file_error, is_int, map_file, parse_errors_as
from .lazy import LazyArray, bf16_bits_to_float32, with_byte_order
from .safe_pickle import ArrayHandle, container_globals, materialize, unpickle

__all__ = ["TORCH_LEGACY_MAGIC", "load_torch_legacy", "load_torch_zip"]

_MAX_COMPRESSED_RECORD = 256 * 1024 * 1024


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

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
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
            **container_globals(path),
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
            raise file_error(self._path, f"unsupported persistent id {str(pid)[:100]!r}; expected a tensor storage")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if self._legacy and pid[5] is not None:
            raise file_error(self._path, "storage views from pre-1.0 torch files are not supported")
        if not isinstance(storage_type, _StorageType):
            raise file_error(self._path, f"storage type {storage_type!r} is not a torch storage class")
        if not isinstance(key, str) or not is_int(numel) or numel < 0:
            raise file_error(self._path, f"malformed storage reference (key {key!r}, numel {numel!r})")
        storage = self._storages.get(key)
        if storage is None:
            storage = _Storage(key, storage_type.element, self._storage_data(key, storage_type, numel), self._order)
            self._storages[key] = storage
        elif storage.element != storage_type.element:
            raise file_error(self._path, f"storage {key!r} is used with two different element types")
        return storage

    # -- tensor reconstruction ----------------------------------------------------------

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> Optional[ArrayHandle]:
        return self._tensor(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v2(
        self, storage: Any, storage_offset: Any, size: Any, stride: Any, *unused: Any
    ) -> Optional[ArrayHandle]:
        # unused: requires_grad, backward_hooks, metadata (autograd and conj/neg bits).
        return self._tensor(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v3(
        self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
        *unused: Any,
    ) -> Optional[ArrayHandle]:
        # torch uses v3 for element types without a typed storage class (uint16/32/64,
        # float8): the storage is untyped bytes and the dtype comes separately.
        if not isinstance(dtype, _TorchDtype):
            raise file_error(self._path, f"tensor dtype {dtype!r} is not a torch dtype")
        return self._tensor(storage, storage_offset, size, stride, dtype)

    def _rebuild_parameter(self, data: Any, *unused: Any) -> Any:
        # unused: requires_grad, hooks and (for _rebuild_parameter_with_state) Python attributes.
        if data is not None and not isinstance(data, ArrayHandle):
            raise file_error(self._path, f"parameter data is {type(data).__name__}, not a tensor")
        return data

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
        # torch wraps tensors that carry Python attributes this way; the attributes are dropped.
        if func not in self._tensor_builders or not isinstance(new_type, _TorchClass) or not isinstance(args, tuple):
            raise file_error(self._path, "unsupported tensor subclass reconstruction")
        return func(*args)

    def _tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, dtype: Optional[_TorchDtype]
    ) -> Optional[ArrayHandle]:
        if not isinstance(storage, _Storage):
            raise file_error(self._path, "tensor is not backed by a storage record")
        if not (
            is_int(offset)
            and offset >= 0
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(is_int(v) and v >= 0 for v in size + stride)
        ):
            raise file_error(self._path, f"malformed tensor geometry (offset {offset!r}, size {size!r}, stride {stride!r})")
        element = storage.element
        if dtype is not None:
            element = _TORCH_ELEMENT_TYPES.get(dtype.name)
            if element is None:
                raise file_error(self._path, f"tensor dtype torch.{dtype.name} is not supported (no numpy equivalent)")
            if storage.element is not None and storage.element != element:
                raise file_error(self._path, f"tensor dtype torch.{dtype.name} does not match its storage")
        if element is None:
            raise file_error(self._path, "tensor over an untyped storage has no dtype")
        if storage.data is None:  # dry run
            return None

        data = storage.data
        if storage.element is None:  # untyped bytes: reinterpret as the tensor's element type
            raw = with_byte_order(element.raw, storage.order)
            if data.size % raw.itemsize:
                raise file_error(self._path, f"storage {storage.key!r} of {data.size} bytes does not hold whole {element.torch_name}")
            data = data.view(raw)
        numel = math.prod(size)
        if numel == 0:
            return ArrayHandle(self._path, _decode_torch(np.empty(size, dtype=data.dtype), element))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size or numel > data.size:
            raise file_error(
                self._path,
                f"tensor of size {list(size)} (offset {offset}, stride {list(stride)}) does not fit its "
                f"storage {storage.key!r} of {data.size} elements",
            )
        contiguous = all(n == 1 or s == math.prod(size[i + 1:]) for i, (n, s) in enumerate(zip(size, stride)))
        if contiguous:
            view = data[offset:offset + numel].reshape(size)
            if view.dtype.isnative and element.kind == "plain":
                return ArrayHandle(self._path, view)  # the file's bytes, untouched until read
            return ArrayHandle(
                self._path, LazyArray(lambda v: _decode_torch(v, element), view, shape=size, dtype=_decoded_dtype(element))
            )

        def gather(storage_data: np.ndarray) -> np.ndarray:
            itemsize = storage_data.dtype.itemsize
            strided = np.lib.stride_tricks.as_strided(
                storage_data[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False
            )
            return _decode_torch(np.ascontiguousarray(strided), element)

        return ArrayHandle(self._path, LazyArray(gather, data, shape=size, dtype=_decoded_dtype(element)))


def _decoded_dtype(element: _ElementType) -> np.dtype:
    return {"bf16": np.dtype(np.float32), "bool": np.dtype(np.bool_)}.get(element.kind, element.raw)


def _decode_torch(array: np.ndarray, element: _ElementType) -> np.ndarray:
    """Raw storage elements -> the numpy array they mean (native order, bf16 widened, 0/1 bools)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("=").str)
    if element.kind == "bf16":
        return bf16_bits_to_float32(array)
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
            raise file_error(self._path, f"tensors of type torch.{name} are not supported (no numpy equivalent)")
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
        raise file_error(path, f"archive has no record {name!r}") from None
    if info.flag_bits & 0x1:
        raise file_error(path, f"record {name!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        # Not what torch writes, but a re-zipped archive may have it. zipfile stops at the
        # declared size and checks the CRC; the cap keeps a zip bomb from filling memory.
        if info.file_size > _MAX_COMPRESSED_RECORD:
            raise file_error(
                path,
                f"record {name!r} is compressed and {info.file_size} bytes; torch writes records uncompressed, "
                f"compressed ones are accepted only up to {_MAX_COMPRESSED_RECORD} bytes. Re-save the checkpoint "
                "with torch.save or as safetensors.",
            )
        return np.frombuffer(zf.read(name), dtype=np.uint8)
    offset = info.header_offset
    local_header = mm[offset:offset + 30]
    if len(local_header) != 30 or local_header[:4] != b"PK\x03\x04":
        raise file_error(path, f"record {name!r} has a bad local header")
    name_len, extra_len = struct.unpack("<HH", local_header[26:30])
    start = offset + 30 + name_len + extra_len
    if info.compress_size != info.file_size or start + info.file_size > len(mm):
        raise file_error(path, f"record {name!r} runs past the end of the file (truncated download?)")
    if info.file_size == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(mm, dtype=np.uint8, count=info.file_size, offset=start)


def load_torch_zip(path: PathLike) -> Any:
    mm = map_file(path)
    with parse_errors_as(path, "zip archive"), open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
        names = zf.namelist()
        prefixes = sorted({n.split("/", 1)[0] for n in names if n.count("/") == 1 and n.endswith("/data.pkl")})
        if any(n.split("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in names):
            raise file_error(path, _TORCHSCRIPT_HINT)
        if len(prefixes) != 1:
            raise file_error(
                path,
                f"zip archive has {len(prefixes)} '<name>/data.pkl' records, a torch checkpoint has exactly one "
                f"(first entries: {names[:5]})",
            )
        prefix = prefixes[0]
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = bytes(_zip_record(path, zf, mm, f"{prefix}/byteorder")).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise file_error(path, f"unknown byteorder record {byteorder!r}")
        order = "<" if byteorder == "little" else ">"

        def storage_data(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
            raw = _zip_record(path, zf, mm, f"{prefix}/data/{key}")
            element_dtype = np.dtype("u1") if storage_type.element is None else storage_type.element.raw
            if raw.size != numel * element_dtype.itemsize:
                raise file_error(
                    path,
                    f"storage record {key!r} has {raw.size} bytes, expected {numel} x {element_dtype.itemsize}",
                )
            return raw.view(with_byte_order(element_dtype, order))

        unpickling = _TorchUnpickling(path, storage_data, order)
        pickled = bytes(_zip_record(path, zf, mm, f"{prefix}/data.pkl"))
        return materialize(path, unpickle(pickled, path, unpickling.unpickler_table(), unpickling.persistent_load))


def load_torch_legacy(path: PathLike) -> Any:
    """Pre-1.6 torch files: magic, protocol and sys-info pickles, the main pickle, a pickle of
    storage keys, then each storage's element count (u64) and bytes in key order.

    The main pickle is read twice: a dry run learns each storage's element type, which is
    needed to find where each storage's bytes start, then the real run builds the arrays.
    """
    mm = map_file(path)
    stream = mm
    with parse_errors_as(path, "legacy torch file"):
        if unpickle(stream, path, {}) != TORCH_LEGACY_MAGIC:
            raise file_error(path, "not a torch file (bad magic number)")
        if unpickle(stream, path, {}) != _TORCH_LEGACY_PROTOCOL:
            raise file_error(path, "unsupported legacy torch protocol version")
        sys_info = unpickle(stream, path, {})
        if not isinstance(sys_info, dict) or not isinstance(sys_info.get("little_endian"), bool):
            raise file_error(path, "legacy torch file has malformed system info")
        order = "<" if sys_info["little_endian"] else ">"
        main_start = stream.tell()

        dry = _TorchUnpickling(path, lambda key, storage_type, numel: None, order, legacy=True)
        unpickle(stream, path, dry.unpickler_table(), dry.persistent_load)
        keys = unpickle(stream, path, {})
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise file_error(path, "legacy torch file has a malformed storage key list")
        offsets: Dict[str, Tuple[int, int]] = {}
        position = stream.tell()
        for key in keys:
            storage = dry._storages.get(key)
            if storage is None or storage.element is None:
                raise file_error(path, f"storage {key!r} is listed but not used by any tensor")
            if position + 8 > len(mm):
                raise file_error(path, "file ends inside the storage data (truncated download?)")
            (numel,) = struct.unpack("<Q" if order == "<" else ">Q", mm[position:position + 8])
            nbytes = numel * storage.element.raw.itemsize
            if position + 8 + nbytes > len(mm):
                raise file_error(path, "file ends inside the storage data (truncated download?)")
            offsets[key] = (position + 8, numel)
            position += 8 + nbytes

        def storage_data(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
            if key not in offsets:
                raise file_error(path, f"storage {key!r} has no data")
            start, stored_numel = offsets[key]
            if stored_numel != numel:
                raise file_error(path, f"storage {key!r} holds {stored_numel} elements, the pickle expects {numel}")
            dtype = with_byte_order(storage_type.element.raw, order)
            if numel == 0:
                return np.empty(0, dtype=dtype)
            return np.frombuffer(mm, dtype=dtype, count=numel, offset=start)

        stream.seek(main_start)
        real = _TorchUnpickling(path, storage_data, order, legacy=True)
        return materialize(path, unpickle(stream, path, real.unpickler_table(), real.persistent_load))
