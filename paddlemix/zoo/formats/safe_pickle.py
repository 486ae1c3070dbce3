"""The restricted unpickler every pickle-based weights format goes through.

Hand-written on purpose. ``torch.load`` and ``pickle.load`` run whatever code a pickle asks for,
so a downloaded ``.bin`` is a program, not data; reading torch files through torch would also
make torch a dependency. This unpickler resolves globals only from an explicit table of inert
stand-ins (each format supplies its own: :mod:`.torch_pickle`, :mod:`.pdparams`) and refuses
everything else by name. It is built on Python's pure-Python unpickler, not the C one: the C
unpickler sizes its memo by the largest index a pickle names, so a 10-byte file can make it
allocate gigabytes. Arrays are sealed in handles while the pickle runs, so a later opcode cannot
modify them, and taken out only once it has finished (:func:`materialize`).
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from .common import PathLike, file_error, parse_errors_as

__all__ = ["ArrayHandle", "RestrictedUnpickler", "container_globals", "materialize", "unpickle"]

# Protocol 2 pickles written by Python 3 use Python 2 module names for builtins.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def container_globals(path: PathLike) -> Dict[Tuple[str, str], Any]:
    """Globals plain containers need in any pickle.

    Each load gets fresh callables: a pickle can BUILD attributes onto any object it can
    name, and must not be able to change a function the next load will use.
    """

    def latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
        # Protocol 2 has no bytes opcode: Python 3 pickles bytes as _codecs.encode(str, "latin1").
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise file_error(path, f"_codecs.encode is only allowed for latin1 bytes, got encoding {encoding!r}")
        return text.encode("latin1")

    return {("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): latin1_bytes}


class ArrayHandle:
    """An array built during unpickling, sealed against the pickle.

    Returning a bare ndarray would let a later BUILD opcode call its __setstate__ or set its
    shape/strides; a handle refuses BUILD, and the arrays are taken out only after the
    pickle has finished (see materialize).
    """

    __slots__ = ("path", "array")

    def __init__(self, path: PathLike, array: Optional[np.ndarray] = None) -> None:
        self.path = path
        self.array = array

    def __setstate__(self, state: Any) -> None:
        raise file_error(self.path, "pickle tries to modify a tensor after creating it")


def materialize(path: PathLike, obj: Any, paddle_pairs: bool = False) -> Any:
    """Replace array handles by their arrays throughout dicts, lists and tuples.

    Shared containers are converted once (a pickle can reference one list from many places,
    which walked naively is exponential), cycles and absurd nesting are refused.
    ``paddle_pairs``: Paddle pickles tensors outside a flat state dict as (name, array).
    """
    done: Dict[int, Any] = {}
    in_progress = set()

    def convert(value: Any, depth: int) -> Any:
        if isinstance(value, ArrayHandle):
            if value.array is None:
                raise file_error(path, "pickle creates an array but never gives it data")
            return value.array
        if not isinstance(value, (dict, list, tuple)):
            return value
        key = id(value)
        if key in done:
            return done[key]
        if key in in_progress or depth > 100:
            raise file_error(path, "pickle has self-referencing or too deeply nested containers")
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


class RestrictedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python unpickler, on purpose
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
            raise file_error(self._path, "pickle data was truncated")
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
            raise file_error(
                self._path,
                f"refused to load global '{module}.{name}': a weights file needs only tensors and "
                "plain containers, and loading anything else could run code. If you trust this file, "
                "convert it to safetensors (e.g. with open_clip or safetensors.torch.save_file) and load that.",
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise file_error(self._path, "pickle refers to external storage, which this format does not have")
        return self._persistent_load(pid)


def unpickle(
    data: Any,
    path: PathLike,
    allowed: Mapping[Tuple[str, str], Any],
    persistent_load: Optional[Callable[[Any], Any]] = None,
) -> Any:
    stream = data if hasattr(data, "read") else io.BytesIO(data)  # mmap objects have read/readline
    with parse_errors_as(path, "pickle"):
        return RestrictedUnpickler(stream, path, allowed, persistent_load).load()
