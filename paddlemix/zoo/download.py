"""Download and cache layer of the model zoo.

Model files are large (up to tens of GB), fetched over flaky links, often by
every rank of a distributed job at the same moment, and then reused offline for
months. Hence the rules this module keeps:

* A file in the cache is always complete: bytes arrive in ``<file>.part`` next to
  it and are renamed into place only after the size (and sha256, when known) has
  been checked, so no reader ever sees a half-written file.
* An interrupted transfer is resumed with an HTTP ``Range`` request instead of
  starting over; transient failures are retried with exponential back-off.
* One process downloads, the others wait: an exclusive lock (``filelock``) on
  ``<file>.lock`` serialises everyone who wants the same file.
* After a fetch, ``<file>.sha256`` records the hash, size and mtime of what was
  verified, so a later cache hit costs one ``stat`` unless the file changed.
* Offline mode (``PADDLEMIX_OFFLINE=1`` or ``offline=True``) never opens a
  connection; a missing file is reported with the exact path it was looked for.

Transfers use only the standard library (``urllib``) and ``tqdm``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Optional, Tuple

from tqdm import tqdm

from .._util import exclusive_lock, fsync_dir
from ..errors import PaddleMIXError


__all__ = [
    "DEFAULT_MODEL_HOST",
    "ENV_HOME",
    "ENV_MODEL_HOST",
    "ENV_OFFLINE",
    "DownloadError",
    "cache_dir",
    "cached_path",
    "download_file",
    "fetch",
    "file_sha256",
    "is_offline",
    "model_cache_dir",
    "model_url",
    "resolve_host",
]

_logger = logging.getLogger(__name__)

# Where PaddleMIX hosts its converted CLIP weights, e.g.
# <host>/paddlemix/CLIP/CLIP-ViT-L-14-laion2B-s32B-b82K/model_state.pdparams
DEFAULT_MODEL_HOST = "https://bj.bcebos.com/v1/paddlenlp/models/community"
ENV_HOME = "PADDLEMIX_HOME"
ENV_MODEL_HOST = "PADDLEMIX_MODEL_HOST"
ENV_OFFLINE = "PADDLEMIX_OFFLINE"
_DEFAULT_HOME = "~/.cache/paddlemix"

_CHUNK_BYTES = 1 << 20
_MAX_BACKOFF_S = 60.0
_USER_AGENT = "paddlemix-zoo"
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_URL_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# Statuses worth retrying: the server or a proxy is overloaded or timed out.
_RETRY_HTTP_CODES = frozenset({408, 425, 429})


class DownloadError(PaddleMIXError, RuntimeError):
    """A model file could not be made available in the cache."""


class _Transient(Exception):
    """A failure that another attempt may not hit (dropped connection, 5xx, timeout)."""


class _Corrupt(Exception):
    """The transfer completed but the bytes are not the expected ones."""


class _Restart(Exception):
    """The partial file is longer than the source: it is not a prefix of it."""


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root of the cache: ``$PADDLEMIX_HOME``, else ``~/.cache/paddlemix``."""
    return Path(os.environ.get(ENV_HOME) or _DEFAULT_HOME).expanduser()


def _relative_name(name: str, what: str) -> PurePosixPath:
    """Validate a '/'-separated name that becomes part of a cache path and a URL.

    Names come from users and registries; one like ``../../.bashrc`` must never
    let a download write outside the cache.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    parts = name.split("/")
    bad = (
        name.startswith("/")
        or "\\" in name
        or "\0" in name
        or re.match(r"[A-Za-z]:", name) is not None
        or any(p in ("", ".", "..") for p in parts)
    )
    if bad:
        raise ValueError(
            f"{what} {name!r} must be a relative path of plain names joined by '/' "
            "(no leading '/', backslash, drive letter, empty, '.' or '..' parts), "
            "e.g. 'paddlemix/CLIP/CLIP-ViT-L-14-laion2B-s32B-b82K'"
        )
    return PurePosixPath(*parts)


def model_cache_dir(model_name: str) -> Path:
    """Directory holding the files of one model: ``<root>/models/<model_name>``."""
    return cache_dir() / "models" / _relative_name(model_name, "model name")


def cached_path(model_name: str, filename: str) -> Path:
    """Where ``fetch(model_name, filename)`` keeps the file (whether or not it is there yet)."""
    return model_cache_dir(model_name) / _relative_name(filename, "file name")


def _sidecar(dest: Path, suffix: str) -> Path:
    return dest.with_name(dest.name + suffix)


# ------------------------------------------------------------------ host / offline


def resolve_host(host: Optional[str] = None) -> str:
    """The host to download from: the argument, else ``$PADDLEMIX_MODEL_HOST``, else the default.

    A host is an ``http(s)://`` or ``file://`` URL, or a local directory laid out
    like the remote one (``<host>/<model name>/<file>``), so a company mirror or
    a shared disk replaces the public host without code changes.
    """
    chosen = host if host is not None else (os.environ.get(ENV_MODEL_HOST) or DEFAULT_MODEL_HOST)
    if not chosen:
        raise ValueError(f"host must be a URL or a directory, got {chosen!r}")
    match = _URL_SCHEME_RE.match(chosen)
    if match and match.group(0).lower() not in ("http://", "https://", "file://"):
        raise ValueError(
            f"model host {chosen!r} has an unsupported scheme; use http://, https://, file:// or a local directory"
        )
    return chosen


def is_offline(offline: Optional[bool] = None) -> bool:
    """The argument when given, else whether ``$PADDLEMIX_OFFLINE`` is set to a true value."""
    if offline is not None:
        return bool(offline)
    value = os.environ.get(ENV_OFFLINE, "").strip().lower()
    if value in _TRUE_WORDS:
        return True
    if value not in _FALSE_WORDS:
        raise ValueError(f"{ENV_OFFLINE}={value!r} is not understood; use 1 (offline) or 0 (online)")
    return False


def model_url(model_name: str, filename: str, host: Optional[str] = None) -> str:
    """Location of a model file on the host: ``<host>/<model_name>/<filename>``.

    For a local-directory host this is a plain filesystem path.
    """
    base = resolve_host(host)
    rel = f"{_relative_name(model_name, 'model name')}/{_relative_name(filename, 'file name')}"
    if _URL_SCHEME_RE.match(base):
        return base.rstrip("/") + "/" + urllib.parse.quote(rel)
    return str(Path(base).expanduser() / rel)


# ------------------------------------------------------------------- verification


def file_sha256(path: os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _normalize_sha256(sha256: Optional[str]) -> Optional[str]:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return value


@dataclass(frozen=True)
class _Record:
    """What ``<file>.sha256`` says about the file as it was when last verified."""

    sha256: str
    size: int
    mtime_ns: int


def _write_record(dest: Path, sha256: str) -> None:
    """Write ``<file>.sha256``; the first line keeps ``sha256sum -c`` working.

    Size and mtime go on a comment line (``sha256sum`` skips it): while both
    still match, the file is the one that was hashed, so reuse needs no rehash.
    """
    st = dest.stat()
    text = f"{sha256}  {dest.name}\n# size={st.st_size} mtime_ns={st.st_mtime_ns}\n"
    record = _sidecar(dest, ".sha256")
    tmp = _sidecar(dest, f".sha256.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, record)
    except OSError as exc:
        # A read-only shared cache is still usable; it just gets re-hashed next time.
        _logger.warning("Could not write checksum record %s: %s", record, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read_record(dest: Path) -> Optional[_Record]:
    record = _sidecar(dest, ".sha256")
    try:
        lines = record.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        _logger.warning("Ignoring unreadable checksum record %s: %s", record, exc)
        return None
    fields = dict(re.findall(r"(\w+)=(\d+)", lines[1])) if len(lines) > 1 else {}
    digest = lines[0].split()[0].lower() if lines and lines[0].split() else ""
    if not _SHA256_RE.fullmatch(digest) or "size" not in fields or "mtime_ns" not in fields:
        _logger.warning("Ignoring malformed checksum record %s", record)
        return None
    return _Record(digest, int(fields["size"]), int(fields["mtime_ns"]))


def _cached_file_problem(dest: Path, sha256: Optional[str], expected_size: Optional[int]) -> Optional[str]:
    """None when the existing ``dest`` may be used; otherwise what is wrong with it.

    The file is re-hashed only when it changed since its record was written, has
    no record (e.g. copied in by hand for offline use: trusted on first use), or
    the caller's sha256 differs from the recorded one.
    """
    st = dest.stat()
    if expected_size is not None and st.st_size != expected_size:
        return f"size is {st.st_size} bytes, expected {expected_size}"
    record = _read_record(dest)
    unchanged = record is not None and (record.size, record.mtime_ns) == (st.st_size, st.st_mtime_ns)
    if unchanged and (sha256 is None or sha256 == record.sha256):
        return None
    reference = sha256 if sha256 is not None else (record.sha256 if record is not None else None)
    actual = file_sha256(dest)
    if reference is not None and actual != reference:
        source = "expected" if sha256 is not None else f"recorded in {_sidecar(dest, '.sha256').name} when it was fetched"
        return f"sha256 is {actual}, {source} {reference}"
    _write_record(dest, actual)
    return None


def _content_problem(size: int, sha256: str, want_sha256: Optional[str], want_size: Optional[int]) -> Optional[str]:
    if want_size is not None and size != want_size:
        return f"got {size} bytes, expected {want_size}"
    if want_sha256 is not None and sha256 != want_sha256:
        return f"got sha256 {sha256}, expected {want_sha256}"
    return None


# ------------------------------------------------------------------------ sources


def _is_url(location: str) -> bool:
    return _URL_SCHEME_RE.match(location) is not None and not location.lower().startswith("file://")


def _local_path(location: str) -> Path:
    if location.lower().startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(location).path))
    return Path(location).expanduser()


def _parse_content_range(value: Optional[str], url: str) -> Tuple[int, Optional[int]]:
    match = _CONTENT_RANGE_RE.fullmatch((value or "").strip())
    if match is None:
        raise _Transient(f"{url} answered 206 with an unusable Content-Range {value!r}")
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _open_http(url: str, offset: int, timeout: float) -> Tuple[BinaryIO, int, Optional[int]]:
    """Open ``url`` from byte ``offset``; return (stream, first byte served, total size or None)."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            raise _Restart() from exc
        if exc.code >= 500 or exc.code in _RETRY_HTTP_CODES:
            raise _Transient(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
        raise DownloadError(
            f"{url} answered HTTP {exc.code} {exc.reason}. Check the model name and file name, "
            f"and the host (argument host= or ${ENV_MODEL_HOST})."
        ) from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
        raise _Transient(f"cannot reach {url}: {exc}") from exc
    if response.status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"), url)
        return response, start, total
    length = response.headers.get("Content-Length")
    return response, 0, int(length) if length is not None and length.isdigit() else None


def _open_local(path: Path, offset: int) -> Tuple[BinaryIO, int, Optional[int]]:
    try:
        stream = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise DownloadError(f"{path} does not exist or is not a file; check the host directory and the model name") from exc
    except OSError as exc:
        raise DownloadError(f"cannot read {path}: {exc}") from exc
    total = os.fstat(stream.fileno()).st_size
    if offset > total:
        stream.close()
        raise _Restart()
    stream.seek(offset)
    return stream, offset, total


# ----------------------------------------------------------------------- transfer


def _open_source(source: str, offset: int, timeout: float) -> Tuple[BinaryIO, int, Optional[int]]:
    if _is_url(source):
        return _open_http(source, offset, timeout)
    return _open_local(_local_path(source), offset)


def _transfer_once(source: str, part: Path, timeout: float, progress: bool) -> Tuple[int, str]:
    """One attempt to complete ``part``; returns (size, sha256) of the finished file."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        stream, start, total = _open_source(source, offset, timeout)
    except _Restart:
        _logger.info("%s is shorter than the %d bytes already fetched; starting over", source, offset)
        part.unlink()
        offset = 0
        stream, start, total = _open_source(source, offset, timeout)
    with contextlib.closing(stream):
        if start != offset:
            # A server that ignores Range sends the whole file with 200: use it from byte 0.
            _logger.info("%s did not resume at byte %d; starting over", source, offset)
            part.unlink(missing_ok=True)
            if start != 0:
                raise _Transient(f"{source} served from byte {start} instead of {offset}")
            offset = 0
        digest = hashlib.sha256()
        if offset:
            _logger.info("Resuming %s at byte %d", source, offset)
            with open(part, "rb") as done:
                while chunk := done.read(_CHUNK_BYTES):
                    digest.update(chunk)
        written = offset
        bar = tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[: -len(".part")], disable=not progress, leave=False,
        )
        with bar, open(part, "ab") as out:
            try:
                while True:
                    try:
                        chunk = stream.read(_CHUNK_BYTES)
                    except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, IncompleteRead
                        raise _Transient(f"connection to {source} lost after {written} of {total} bytes: {exc}") from exc
                    if not chunk:
                        break
                    out.write(chunk)  # a full disk is not transient: it propagates as OSError
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            finally:
                # Keep what arrived: the next attempt (or run) resumes from it.
                out.flush()
                os.fsync(out.fileno())
    if total is not None and written < total:
        raise _Transient(f"{source} stopped after {written} of {total} bytes")
    if total is not None and written > total:
        raise _Corrupt(f"got {written} bytes, the server announced {total}")
    return written, digest.hexdigest()


def _transfer(source: str, part: Path, retries: int, backoff: float, timeout: float, progress: bool) -> Tuple[int, str]:
    """Complete ``part``, retrying transient failures with exponential back-off.

    An attempt that added bytes resets the failure count, so a huge file over a
    link that drops every few minutes still completes.
    """
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            return _transfer_once(source, part, timeout, progress)
        except _Transient as exc:
            after = part.stat().st_size if part.exists() else 0
            failures = 1 if after > before else failures + 1
            if failures > retries:
                raise DownloadError(
                    f"giving up on {source} after {failures} failed attempts in a row: {exc}. "
                    f"{after} bytes are kept in {part}; run again to resume."
                ) from exc
            delay = min(backoff * 2 ** (failures - 1), _MAX_BACKOFF_S)
            _logger.warning("%s; retry %d/%d in %.2f s", exc, failures, retries, delay)
            time.sleep(delay)


def download_file(
    url: str,
    dest: os.PathLike,
    *,
    sha256: Optional[str] = None,
    expected_size: Optional[int] = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Make ``dest`` a verified copy of ``url`` and return its path.

    Args:
        url: ``http(s)://`` or ``file://`` URL, or a local file path.
        dest: Final path; ``<dest>.part``, ``.lock`` and ``.sha256`` live beside it.
        sha256: Expected hex digest. A cached file that does not match is replaced.
        expected_size: Expected size in bytes, checked like ``sha256``.
        retries: Transient failures (connection errors, timeouts, HTTP 5xx/429)
            tolerated in a row before giving up; a 404 fails at once.
        backoff: First retry delay in seconds, doubled after each failure.
        timeout: Socket timeout in seconds for connecting and for each read.
        progress: Show a tqdm progress bar on stderr.

    A complete but wrong file (bad size or sha256) is deleted and fetched once
    more from scratch, in case the bytes were damaged on the way; if the second
    copy is wrong too, ``DownloadError`` reports both values and nothing is kept.
    """
    dest = Path(dest)
    sha256 = _normalize_sha256(sha256)
    if retries < 0 or backoff < 0 or timeout <= 0:
        raise ValueError(f"need retries >= 0, backoff >= 0, timeout > 0; got {retries}, {backoff}, {timeout}")
    try:
        # Lock-free fast path: every rank of a job checks its cache hit in parallel.
        if _cached_file_problem(dest, sha256, expected_size) is None:
            return dest
    except FileNotFoundError:
        pass  # not cached, or deleted as corrupt by a process holding the lock
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(_sidecar(dest, ".lock"), f"downloading {dest.name}"):
        # Whoever held the lock before us may have fetched the file meanwhile.
        if dest.is_file():
            problem = _cached_file_problem(dest, sha256, expected_size)
            if problem is None:
                return dest
            _logger.warning("Cached %s is unusable (%s); fetching it again from %s", dest, problem, url)
            dest.unlink()
            _sidecar(dest, ".sha256").unlink(missing_ok=True)
        part = _sidecar(dest, ".part")
        _logger.info("Downloading %s to %s", url, dest)
        for attempt in (1, 2):
            try:
                size, digest = _transfer(url, part, retries, backoff, timeout, progress)
                problem = _content_problem(size, digest, sha256, expected_size)
            except _Corrupt as exc:
                problem = str(exc)
            if problem is None:
                break
            part.unlink(missing_ok=True)
            if attempt == 1:
                _logger.warning("%s is corrupt (%s); deleting it and fetching it again from scratch", url, problem)
        else:
            raise DownloadError(
                f"{url} failed verification twice ({problem}); nothing was kept at {dest}. "
                "The copy on the host (or a proxy cache) is damaged, or the expected checksum is wrong."
            )
        os.replace(part, dest)
        fsync_dir(dest.parent)
        _write_record(dest, digest)
    return dest


def fetch(
    model_name: str,
    filename: str,
    *,
    host: Optional[str] = None,
    sha256: Optional[str] = None,
    expected_size: Optional[int] = None,
    offline: Optional[bool] = None,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Path of ``<model_name>/<filename>`` in the cache, downloading it from the host if needed.

    ``host`` overrides ``$PADDLEMIX_MODEL_HOST``; ``offline`` overrides
    ``$PADDLEMIX_OFFLINE``. The cache path does not depend on the host, so files
    fetched from a mirror serve later calls that name another host. Other
    arguments are those of :func:`download_file`.
    """
    dest = cached_path(model_name, filename)
    if not is_offline(offline):
        return download_file(
            model_url(model_name, filename, host), dest, sha256=sha256, expected_size=expected_size,
            retries=retries, backoff=backoff, timeout=timeout, progress=progress,
        )
    reason = "offline=True" if offline else f"{ENV_OFFLINE}=1"
    if not dest.is_file():
        raise DownloadError(
            f"{filename!r} of model {model_name!r} is not cached and offline mode is on ({reason}), "
            f"so nothing was downloaded. Looked for {dest}. To fix: run once with network access, "
            f"or copy the file to that path (the cache root is ${ENV_HOME}, now {cache_dir()})."
        )
    problem = _cached_file_problem(dest, _normalize_sha256(sha256), expected_size)
    if problem is not None:
        raise DownloadError(
            f"Cached {dest} is corrupt ({problem}) and offline mode is on ({reason}), so it cannot be "
            "fetched again. To fix: delete it and run once with network access, or copy a good copy there."
        )
    return dest
