"""Pickles of numpy arrays: Paddle ``.pdparams`` weights, and array datasets such as CIFAR's.

``paddle.save`` pickles a state dict of numpy arrays; ``paddle.load`` unpickles it with the
stock unpickler, which runs any code the file names. Here the pickle goes through
:mod:`.safe_pickle` with stand-ins for the few numpy globals an array needs, each of which checks
its arguments (numpy's own ``dtype.__setstate__`` trusts a pickle with flags that can turn floats
into object pointers). The arrays' bytes are inline in the pickle, so they come out as copies.
Paddle splits arrays over 1 GiB into slices; they are joined back here.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, NamedTuple, Tuple

import numpy as np

from .common import PathLike, file_error, is_int, map_file, parse_errors_as
from .lazy import with_byte_order
from .safe_pickle import ArrayHandle, RestrictedUnpickler, container_globals, materialize, unpickle

__all__ = ["load_array_pickle", "load_pdparams"]

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
            raise file_error(self.path, f"unsupported numpy dtype state {str(state)[:80]}")
        if state[1] in "<>":
            self.dtype = with_byte_order(self.dtype, state[1])


class _PickledArray(ArrayHandle):
    """Stand-in for a pickled ndarray: BUILD gives (version, shape, dtype, fortran, bytes) once."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise file_error(self.path, "pickle sets an array's data twice")
        if isinstance(state, tuple) and len(state) == 4:  # version 0 had no version field
            state = (0,) + state
        if not (isinstance(state, tuple) and len(state) == 5):
            raise file_error(self.path, "malformed numpy array state")
        _, shape, dtype, fortran, data = state
        if not (
            isinstance(shape, tuple)
            and all(is_int(n) and n >= 0 for n in shape)
            and isinstance(dtype, _PickledDtype)
            and isinstance(fortran, bool)
            and isinstance(data, (bytes, bytearray))
        ):
            raise file_error(self.path, "malformed numpy array state")
        count = math.prod(shape)
        if len(data) != count * dtype.dtype.itemsize:
            raise file_error(
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
            raise file_error(path, f"array subclass {subtype!r} is not allowed")
        return _PickledArray(path)

    def dtype(spec: Any, align: Any = False, copy: Any = False) -> _PickledDtype:
        if not isinstance(spec, str) or not _NUMPY_DTYPE_SPEC.fullmatch(spec):
            raise file_error(path, f"numpy dtype {spec!r} is not a numeric dtype")
        return _PickledDtype(path, np.dtype(spec))

    def scalar(dtype_: Any, data: Any) -> Any:
        if not isinstance(dtype_, _PickledDtype) or not isinstance(data, bytes):
            raise file_error(path, "malformed numpy scalar")
        return np.frombuffer(data, dtype=dtype_.dtype, count=1)[0]

    table: Dict[Tuple[str, str], Any] = {
        **container_globals(path),
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
        raise file_error(path, f"malformed {_PADDLE_BIG_PARAMS_KEY} table")
    for name, info in table.items():
        try:
            slices = [obj.pop(part) for part in info["slices"]]
            shape = tuple(info["OriginShape"])
            if not all(isinstance(s, np.ndarray) and s.ndim == 1 for s in slices):
                raise TypeError("slices are not flat arrays")
            joined = np.concatenate(slices)
            obj[name] = joined.reshape(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise file_error(path, f"cannot rejoin split parameter {name!r} ({type(e).__name__}: {e})") from e
    return obj


def load_pdparams(path: PathLike) -> Any:
    obj = materialize(path, unpickle(map_file(path), path, _numpy_globals(path)), paddle_pairs=True)
    with parse_errors_as(path, "Paddle state dict"):
        return _join_paddle_big_params(path, obj)


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
                raise file_error(path, f"array subclass {subtype!r} is not allowed")
            return _Python2Array(path)

        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            table[(module, "_reconstruct")] = reconstruct
    unpickler = RestrictedUnpickler(map_file(path), path, table)
    if python2:
        unpickler.encoding = "latin1"
    with parse_errors_as(path, "pickle"):
        obj = unpickler.load()
    return materialize(path, obj)
