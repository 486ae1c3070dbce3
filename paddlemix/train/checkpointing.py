"""Atomic training checkpoints: ``checkpoint-N`` exists only once every file in it is complete.

PaddleNLP's Trainer writes a checkpoint's files one after another straight into
``output_dir/checkpoint-N``. A crash, a kill or a full disk part-way leaves a directory
with the weights but no optimizer or scheduler state; ``get_last_checkpoint`` picks it
(it only looks at names) and the resumed run silently restarts its optimizer. Here every
rank writes into a hidden staging folder ``output_dir/.tmp-checkpoint-N``; after all ranks
are done, the files are fsynced and the folder is renamed into place, which is atomic on
one filesystem. The staging name matches neither ``get_last_checkpoint`` nor the rotation
glob, so a half-written checkpoint is never resumed from and never counted.

A save that fails removes its staging folder and raises :class:`CheckpointSaveError`,
which names the cause (a full disk is called out), the last complete checkpoint that was
kept, and how to resume from it.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from typing import Callable, Iterator, Optional

from .._util import fsync_dir
from ..errors import PaddleMIXError

__all__ = ["CheckpointSaveError", "STAGING_PREFIX", "staging_path", "staged_checkpoint", "last_complete_checkpoint"]

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".tmp-"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointSaveError(PaddleMIXError, OSError):
    """A checkpoint could not be written; the previous complete checkpoint is untouched."""


def staging_path(run_dir: str, name: str) -> str:
    """Where ``run_dir/name`` is written before it is renamed into place."""
    return os.path.join(run_dir, STAGING_PREFIX + name)


def last_complete_checkpoint(run_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``run_dir`` (staging folders never count), or None."""
    if not os.path.isdir(run_dir):
        return None
    steps = [(int(m.group(1)), entry) for entry in os.listdir(run_dir)
             if (m := _CHECKPOINT_NAME.match(entry)) and os.path.isdir(os.path.join(run_dir, entry))]
    return os.path.join(run_dir, max(steps)[1]) if steps else None


def _disk_full_errno(error: BaseException) -> Optional[int]:
    """ENOSPC / EDQUOT anywhere in the exception chain (writers often re-raise as their own type)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def _fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root`` so the rename never publishes data still in cache."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def _publish(staged: str, final: str) -> None:
    """Rename ``staged`` to ``final``; an existing ``final`` (a re-run's same step) is replaced."""
    if not os.path.isdir(staged):
        if os.path.isdir(final):
            return  # another node sharing this filesystem published it first
        raise FileNotFoundError(f"staged checkpoint {staged} disappeared before it was moved into place")
    _fsync_tree(staged)
    old = None
    if os.path.exists(final):
        old = final + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_staging(run_dir: str, keep: str) -> None:
    """Staging folders of earlier saves that crashed: never loadable, only taking space."""
    for entry in os.listdir(run_dir):
        if entry.startswith(STAGING_PREFIX + "checkpoint-") and entry != keep:
            logger.warning("removing %s left by an interrupted checkpoint save", os.path.join(run_dir, entry))
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def _save_failed(error: BaseException, run_dir: str, name: str) -> CheckpointSaveError:
    previous = last_complete_checkpoint(run_dir)
    kept = (f"the last complete checkpoint {previous} is kept; resume with --resume_from_checkpoint {previous}"
            if previous else "no earlier checkpoint exists in this output_dir")
    full = _disk_full_errno(error)
    if full is not None:
        free = shutil.disk_usage(run_dir).free / 2**20
        cause = (f"the disk holding {run_dir} is full ({os.strerror(full)}; {free:.0f} MiB free after removing "
                 f"the partial checkpoint)")
        fix = "Free disk space or lower --save_total_limit so fewer checkpoints are kept."
        code = full
    else:
        cause = f"{type(error).__name__}: {error}"
        fix = "Fix the cause above; nothing of the failed save was left in output_dir."
        code = getattr(error, "errno", None) or errno.EIO
    return CheckpointSaveError(code, f"could not save {name} in {run_dir}: {cause}. The partial checkpoint was "
                                     f"removed and {kept}. {fix}")


@contextlib.contextmanager
def staged_checkpoint(
        run_dir: str,
        name: str,
        publisher: bool,
        barrier: Callable[[], None] = lambda: None,
) -> Iterator[str]:
    """Yield a staging root in which ``name`` is to be written; move ``root/name`` to ``run_dir/name`` after.

    Every rank that writes part of the checkpoint must enter this together (``barrier``
    synchronises them: before writing, so no rank writes into a folder still being cleared,
    and after, so the rename happens once all parts exist). ``publisher`` is the one process
    per filesystem (local rank 0) that prepares, renames and cleans up.
    """
    root = staging_path(run_dir, name)
    if publisher:
        os.makedirs(run_dir, exist_ok=True)
        _remove_stale_staging(run_dir, keep=os.path.basename(root))
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
    barrier()
    try:
        yield root
        barrier()
        if publisher:
            _publish(os.path.join(root, name), os.path.join(run_dir, name))
            shutil.rmtree(root, ignore_errors=True)
    except BaseException as e:
        if publisher:
            shutil.rmtree(root, ignore_errors=True)
        if isinstance(e, Exception):
            raise _save_failed(e, run_dir, name) from e
        raise
    barrier()
