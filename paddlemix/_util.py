"""Small helpers that several subpackages need, kept once here so they behave the same everywhere.

Nothing in this module imports from the rest of paddlemix, so any subpackage may use it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, List, Union

import filelock
import numpy as np

__all__ = ["exclusive_lock", "fsync_dir", "l2_normalize", "read_lines"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def exclusive_lock(path: PathLike, activity: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock on the file ``path``; the OS drops it if the holder dies.

    When another process holds it, says so (naming ``activity``, e.g. "downloading model.bin") and
    waits. The lock file is left in place: deleting it would let a late process lock a fresh inode
    while another still holds the old one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(blocking=False)
    except filelock.Timeout:
        logger.info("Waiting for another process to finish %s (lock %s)", activity, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fsync_dir(directory: PathLike) -> None:
    """Make a rename inside ``directory`` durable; some platforms cannot open directories, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: PathLike, what: str = "lines") -> List[str]:
    """Non-empty stripped lines; a blank line inside the file is an error (it would shift every index).

    ``what`` names the file's role in the error (``"labels"``, ``"templates"``).
    """
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line]
    if blank:
        raise ValueError(f"{path}: {what} file has blank line(s) {blank[:5]}; remove them (one entry per line)")
    if not lines:
        raise ValueError(f"{path}: {what} file is empty")
    return lines


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as ``paddle.nn.functional.normalize``: x / max(||x||, 1e-12); keeps x's dtype.

    Computed in at least float32: in float16 the 1e-12 floor is 0, and a zero row would become NaN.
    """
    wide = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    out = wide / np.maximum(np.linalg.norm(wide, axis=-1, keepdims=True), wide.dtype.type(1e-12))
    return out.astype(x.dtype, copy=False)
