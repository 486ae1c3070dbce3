"""Small helpers that several subpackages need, kept once here so they behave the same everywhere.

Nothing in this module imports from the rest of paddlemix, so any subpackage may use it.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator, List, NoReturn, Union

import filelock
import numpy as np

__all__ = [
    "end_job_process", "exclusive_lock", "fsync_dir", "in_multiprocess_job", "l2_normalize", "read_lines", "run_job_rank",
]

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


def in_multiprocess_job() -> bool:
    """True inside an initialised ``paddle.distributed`` job of more than one process."""
    import paddle.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1


def end_job_process(code: int, barrier: bool) -> NoReturn:
    """Leave a multi-process job without the interpreter's teardown.

    Paddle's C++ teardown at exit is not safe against the other ranks: the TCP store that
    rank 0 hosts aborts (SIGABRT) when a rank disconnects while rank 0 is destroying its
    globals, so now and then a launch ended with ``Exit code -6`` although every rank had
    done its work (how often depends on timing). Every entry point that runs under ``paddle.distributed.launch``
    ends through here: after a final barrier (``barrier=True``) every rank has finished;
    the logs are flushed and the process ends with ``os._exit``. A failed rank passes
    ``barrier=False`` and ends at once (the others may wait in a collective), and the
    launcher stops the rest.
    """
    import paddle.distributed as dist

    if barrier:
        dist.barrier()
    # What the skipped teardown would have done for loader workers still alive (an iterator
    # left unfinished): without it they outlive the job, each holding its memory. Their end
    # is expected, so Paddle's check for loader workers killed by a signal is off.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=10)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_job_rank(work: Callable[[], int], what: str) -> int:
    """Run an entry point's ``work`` (returning an exit code); in a multi-process job, end the rank after it.

    Alone, this returns the code and an exception propagates as usual. In a job, an exception is
    logged (naming ``what``) and becomes code 1, and the process ends through
    :func:`end_job_process`, with the final barrier only when every step succeeded: this does
    not return.
    """
    try:
        code = work()
    except Exception:  # noqa: BLE001 - re-raised in one process; reported, then the process ends, in a job
        if not in_multiprocess_job():
            raise
        logger.exception("%s failed; ending this rank so that the launcher stops the others", what)
        code = 1
    if in_multiprocess_job():
        end_job_process(code, barrier=code == 0)
    return code
