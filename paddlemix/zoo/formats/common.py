"""What every weights-format reader shares: the one error type and read-only file mapping.

Readers parse untrusted bytes (downloads, user files). Whatever goes wrong, a caller sees one
:class:`CheckpointError` that names the file and the problem, never a parser's internal exception.
"""
from __future__ import annotations

import contextlib
import mmap
import os
from typing import Any, Iterator, Union

from ...errors import PaddleMIXError

__all__ = ["CheckpointError", "PathLike", "file_error", "is_int", "map_file", "parse_errors_as"]

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(PaddleMIXError, ValueError):
    """A weights file that cannot be read safely: corrupt, truncated, unsupported or malicious."""


def file_error(path: Any, problem: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path) if isinstance(path, os.PathLike) else path}: {problem}")


@contextlib.contextmanager
def parse_errors_as(path: Any, what: str) -> Iterator[None]:
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
        raise file_error(path, f"corrupt or unreadable {what} ({type(e).__name__}: {e})") from e


def map_file(path: PathLike) -> mmap.mmap:
    """Map a file read-only; the mapping outlives the descriptor and any array viewing it."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise file_error(path, "file is empty")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise file_error(path, f"cannot read file ({e.strerror or e})") from e


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
