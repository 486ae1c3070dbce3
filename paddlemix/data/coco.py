"""PaddleMIX's COCO Karpathy archive, fetched once into the cache for ``--task_name coco_karpathy``.

PaddleMIX downloads ``coco.tar`` into its data home (``~/.paddlemix/datasets``) when
``coco_karpathy`` is asked for without a data folder, and reads ``coco/annotations`` and
``coco/images`` from there. Here the same archive lands in ``<cache root>/datasets``, the cache
root being ``$PADDLEMIX_HOME`` (default ``~/.cache/paddlemix``), with the same ``coco/`` layout
below it: ``PADDLEMIX_HOME=~/.paddlemix`` therefore reuses a copy PaddleMIX already fetched.

The transfer is the model zoo's (:mod:`paddlemix.zoo.download`): resumed after a cut connection,
retried, locked against the other ranks of a job, checked against the size the server announces
and the sha256 when one is given. The archive is then extracted into a temporary folder next to
the destination with :mod:`tarfile`'s ``data`` filter (no absolute paths, no ``..``, no links
out of the folder, no device files), every member must lie under ``coco/``, and the annotation
file must be present; only then is the folder renamed into place and the archive deleted. A complete folder (the annotation file and ``images/``, which is also what
PaddleMIX checks) is never fetched or extracted again.
"""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from .._util import exclusive_lock
from ..zoo.download import (  # the zoo's sidecar naming, so datasets follow the same rules
    ENV_HOME,
    ENV_OFFLINE,
    DownloadError,
    _sidecar,
    cache_dir,
    download_file,
    is_offline,
)

logger = logging.getLogger(__name__)

__all__ = ["COCO_URL", "PADDLEMIX_COCO_DIR", "coco_karpathy_root", "default_datasets_dir"]

# Where PaddleMIX's dataset builders (CaptionCLIP and friends) fetch COCO from. PaddleMIX publishes
# no checksum for it; pass sha256= to pin one.
COCO_URL = "https://bj.bcebos.com/v1/paddlenlp/datasets/paddlemix/coco.tar"
# PaddleMIX's own location for the extracted archive (its DATA_HOME under ~/.paddlemix).
PADDLEMIX_COCO_DIR = "~/.paddlemix/datasets/coco"
_FOLDER = "coco"
_ANNOTATION = PurePosixPath("annotations") / "coco_karpathy_train.json"


def default_datasets_dir() -> Path:
    """``<cache root>/datasets``: where downloaded datasets are extracted."""
    return cache_dir() / "datasets"


def _complete(folder: Path) -> bool:
    """What PaddleMIX itself accepts; a folder this module made is only ever renamed into place whole."""
    return (folder / _ANNOTATION).is_file() and (folder / "images").is_dir()


def _place_it_message(folder: Path, why: str) -> str:
    return (
        f"COCO Karpathy data is not at {folder} and {why}. Place it there: extract PaddleMIX's {COCO_URL} "
        f"in {folder.parent} (it holds {_FOLDER}/annotations/{_ANNOTATION.name} and {_FOLDER}/images/), "
        f"or pass --data_root to a COCO folder with that layout (PaddleMIX keeps its copy in "
        f"{PADDLEMIX_COCO_DIR}; ${ENV_HOME}=~/.paddlemix makes this the same folder)."
    )


def _extract(archive: Path, datasets: Path) -> Path:
    """Extract ``archive``'s ``coco/`` folder safely next to ``datasets/coco`` and rename it into place."""
    target = datasets / _FOLDER
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}.", suffix=".extract", dir=datasets))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()  # reads every header: a truncated archive fails here
                outside = [m.name for m in members if PurePosixPath(m.name).parts[:1] != (_FOLDER,)]
                if outside:
                    raise DownloadError(
                        f"{archive} is not PaddleMIX's COCO archive: members outside {_FOLDER}/ "
                        f"({outside[:5]}); nothing was extracted"
                    )
                tar.extractall(tmp, members=members, filter="data")
        except tarfile.FilterError as exc:  # a path or link leading out of the folder, a device file
            raise DownloadError(f"{archive} has an unsafe member ({exc}); nothing was extracted") from exc
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DownloadError(f"{archive} is not a readable tar archive ({exc}); nothing was extracted") from exc
        if not _complete(tmp / _FOLDER):
            raise DownloadError(f"{archive} has no {_FOLDER}/{_ANNOTATION} and {_FOLDER}/images/; nothing was extracted")
        if target.exists():  # an incomplete copy (e.g. PaddleMIX's, interrupted): replaced, not merged
            shutil.rmtree(target)
        os.replace(tmp / _FOLDER, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def coco_karpathy_root(
    datasets_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    url: Optional[str] = None,
    sha256: Optional[str] = None,
    size: Optional[int] = None,
    offline: Optional[bool] = None,
    progress: bool = True,
) -> Path:
    """The COCO folder (``<datasets_dir>/coco``), downloading and extracting PaddleMIX's archive once.

    Args:
        datasets_dir: where ``coco/`` goes (default :func:`default_datasets_dir`).
        url: the archive (default :data:`COCO_URL`, PaddleMIX's; a mirror, or a local path).
        sha256, size: expected checksum / byte count of the archive, when known.
        offline: never use the network (default ``$PADDLEMIX_OFFLINE``); a missing folder is
            then an error naming where to place the data.
    """
    datasets = Path(datasets_dir).expanduser() if datasets_dir is not None else default_datasets_dir()
    target = datasets / _FOLDER
    if _complete(target):
        return target
    if is_offline(offline):
        reason = "offline=True" if offline else f"offline mode is on (${ENV_OFFLINE})"
        raise FileNotFoundError(_place_it_message(target, reason))
    datasets.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(datasets / f"{_FOLDER}.lock", f"downloading and extracting {target}"):
        if _complete(target):  # another rank finished while this one waited
            return target
        archive = datasets / f"{_FOLDER}.tar"
        try:
            download_file(url or COCO_URL, archive, sha256=sha256, expected_size=size, progress=progress)
        except DownloadError as exc:
            raise DownloadError(f"{exc}\n{_place_it_message(target, 'it could not be downloaded')}") from exc
        logger.info("extracting %s into %s", archive, target)
        try:
            _extract(archive, datasets)
        except DownloadError:
            # A damaged archive must not be trusted as a cache hit next time.
            archive.unlink(missing_ok=True)
            _sidecar(archive, ".sha256").unlink(missing_ok=True)
            raise
        archive.unlink()  # tens of GB; the extracted folder is what is kept
        _sidecar(archive, ".sha256").unlink(missing_ok=True)
    logger.info("COCO Karpathy data ready at %s", target)
    return target
