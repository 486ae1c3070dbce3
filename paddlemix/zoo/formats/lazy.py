"""Arrays that stay on disk until read: lazy decoding, page release, and bfloat16 bits.

Loading a checkpoint must not hold a second copy of the model in host memory. Tensors come out
of the readers as read-only views of the memory-mapped file, or, where the stored bytes need
decoding first (bfloat16, a foreign byte order, a strided view), as a :class:`LazyArray` that
decodes only when read. :func:`release` hands a tensor's mapped pages back once the loader has
copied it, so resident memory stays near one tensor beyond the model.

numpy has no bfloat16: reading widens it to float32 exactly (a bit shift), and writing takes
uint16 bits from :func:`to_bfloat16_bits`.
"""
from __future__ import annotations

import mmap
from typing import Any, Callable, Optional, Tuple

import numpy as np

__all__ = ["LazyArray", "bf16_bits_to_float32", "release", "to_bfloat16_bits", "with_byte_order"]


def with_byte_order(dtype: np.dtype, order: str) -> np.dtype:
    """``dtype`` in byte order ``order`` ("<" or ">"), canonical so native types print plainly."""
    return np.dtype(order + dtype.str[1:]) if dtype.itemsize > 1 else dtype


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
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
