"""The zoo's download layer against a real HTTP server on 127.0.0.1 (see zoo_server.py)."""

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from zoo_server import ZooServer, corrupted

from paddlemix.zoo import download as dl
from paddlemix.zoo.download import DownloadError, cache_dir, cached_path, download_file, fetch, model_url

MODEL = "paddlemix/CLIP/tiny-ViT-T-4"
WEIGHTS = "model_state.pdparams"
CONFIG = "config.json"
WEIGHTS_BYTES = random.Random(0).randbytes(200_000)
CONFIG_BYTES = json.dumps({"embed_dim": 8, "vision_cfg": {"width": 16}}).encode()
WEIGHTS_SHA = hashlib.sha256(WEIGHTS_BYTES).hexdigest()
WEIGHTS_PATH = f"{MODEL}/{WEIGHTS}"
FAST = dict(backoff=0.01, progress=False)


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("PADDLEMIX_HOME", str(root))
    monkeypatch.delenv("PADDLEMIX_OFFLINE", raising=False)
    monkeypatch.delenv("PADDLEMIX_MODEL_HOST", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return root


@pytest.fixture
def server(home):
    with ZooServer({WEIGHTS_PATH: WEIGHTS_BYTES, f"{MODEL}/{CONFIG}": CONFIG_BYTES}) as zoo:
        yield zoo


def test_downloads_into_cache_and_records_sha256(server, home):
    path = fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA, **FAST)

    assert path == home / "models" / "paddlemix" / "CLIP" / "tiny-ViT-T-4" / WEIGHTS
    assert path.read_bytes() == WEIGHTS_BYTES
    record = Path(f"{path}.sha256").read_text().splitlines()
    assert record[0] == f"{WEIGHTS_SHA}  {WEIGHTS}"
    assert record[1] == f"# size={len(WEIGHTS_BYTES)} mtime_ns={path.stat().st_mtime_ns}"
    assert not Path(f"{path}.part").exists()
    assert fetch(MODEL, CONFIG, host=server.base_url, **FAST).read_bytes() == CONFIG_BYTES
    # A second call is a cache hit: no new request.
    assert fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA, **FAST) == path
    assert len(server.gets(WEIGHTS_PATH)) == 1


def test_resumes_after_connection_dropped_half_way(server):
    server.drop_after[WEIGHTS_PATH] = 100_000

    path = fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA, **FAST)

    first, second = server.gets(WEIGHTS_PATH)
    assert (first.range, first.status, first.body_bytes) == (None, 200, 100_000)
    assert (second.range, second.status, second.body_bytes) == ("bytes=100000-", 206, 100_000)
    assert first.body_bytes + second.body_bytes < 2 * len(WEIGHTS_BYTES)
    assert path.read_bytes() == WEIGHTS_BYTES


def test_resumes_partial_file_left_by_an_earlier_run(server):
    part = Path(f"{cached_path(MODEL, WEIGHTS)}.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(WEIGHTS_BYTES[:50_000])

    path = fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA, **FAST)

    [only] = server.gets(WEIGHTS_PATH)
    assert (only.range, only.status, only.body_bytes) == ("bytes=50000-", 206, 150_000)
    assert path.read_bytes() == WEIGHTS_BYTES


def test_server_ignoring_range_restarts_cleanly(server):
    server.ignore_range = True
    server.drop_after[WEIGHTS_PATH] = 100_000

    path = fetch(MODEL, WEIGHTS, host=server.base_url, **FAST)

    first, second = server.gets(WEIGHTS_PATH)
    assert (second.range, second.status, second.body_bytes) == ("bytes=100000-", 200, len(WEIGHTS_BYTES))
    assert path.read_bytes() == WEIGHTS_BYTES


def test_stale_partial_longer_than_file_restarts(server):
    part = Path(f"{cached_path(MODEL, WEIGHTS)}.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 300_000)

    path = fetch(MODEL, WEIGHTS, host=server.base_url, **FAST)

    assert [(r.range, r.status) for r in server.gets(WEIGHTS_PATH)] == [("bytes=300000-", 416), (None, 200)]
    assert path.read_bytes() == WEIGHTS_BYTES


def test_corrupt_download_is_deleted_and_fetched_again(server):
    server.corrupt[WEIGHTS_PATH] = 1

    path = fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA, **FAST)

    assert [(r.range, r.status) for r in server.gets(WEIGHTS_PATH)] == [(None, 200), (None, 200)]
    assert path.read_bytes() == WEIGHTS_BYTES


def test_persistent_corruption_raises_with_both_hashes(server):
    server.corrupt[WEIGHTS_PATH] = 10
    bad_sha = hashlib.sha256(corrupted(WEIGHTS_BYTES)).hexdigest()
    url = f"{server.base_url}/{WEIGHTS_PATH}"

    with pytest.raises(DownloadError) as info:
        fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA, **FAST)

    message = str(info.value)
    assert url in message and bad_sha in message and WEIGHTS_SHA in message
    assert len(server.gets(WEIGHTS_PATH)) == 2
    dest = cached_path(MODEL, WEIGHTS)
    assert not dest.exists() and not Path(f"{dest}.part").exists()


def test_wrong_expected_size_raises_with_both_sizes(server):
    with pytest.raises(DownloadError, match=r"got 200000 bytes, expected 199999"):
        fetch(MODEL, WEIGHTS, host=server.base_url, expected_size=199_999, **FAST)
    assert len(server.gets(WEIGHTS_PATH)) == 2


def test_damaged_cache_file_is_detected_from_record_and_fetched_again(server):
    path = fetch(MODEL, WEIGHTS, host=server.base_url, **FAST)
    # Truncated (e.g. an interrupted manual copy): the size no longer matches the record.
    with open(path, "r+b") as fh:
        fh.truncate(1000)
    assert fetch(MODEL, WEIGHTS, host=server.base_url, **FAST).read_bytes() == WEIGHTS_BYTES
    # Same size, one byte changed later: the mtime moved, so the file is re-hashed.
    path.write_bytes(corrupted(WEIGHTS_BYTES))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fetch(MODEL, WEIGHTS, host=server.base_url, **FAST).read_bytes() == WEIGHTS_BYTES
    assert len(server.gets(WEIGHTS_PATH)) == 3


def test_sha256_differing_from_record_is_verified_in_full(server):
    path = fetch(MODEL, WEIGHTS, host=server.base_url, **FAST)
    # The registry learns the hash later: the file is re-hashed, matches, no request.
    record = Path(f"{path}.sha256")
    record.unlink()
    assert fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA.upper(), **FAST) == path
    assert record.read_text().startswith(WEIGHTS_SHA)
    # A registry hash that the served file does not have: refetched, then refused.
    with pytest.raises(DownloadError, match="failed verification twice"):
        fetch(MODEL, WEIGHTS, host=server.base_url, sha256="0" * 64, **FAST)
    assert len(server.gets(WEIGHTS_PATH)) == 3
    assert not path.exists()


def test_5xx_is_retried_with_backoff(server):
    server.fail[WEIGHTS_PATH] = 2

    path = fetch(MODEL, WEIGHTS, host=server.base_url, **FAST)

    assert [r.status for r in server.gets(WEIGHTS_PATH)] == [500, 500, 200]
    assert path.read_bytes() == WEIGHTS_BYTES


def test_stalled_server_times_out_and_is_retried(server):
    server.hold = threading.Event()
    release = threading.Thread(target=lambda: (_wait_for(lambda: len(server.gets(WEIGHTS_PATH)) == 2), server.hold.set()))
    release.start()

    path = fetch(MODEL, WEIGHTS, host=server.base_url, timeout=0.3, retries=1, **FAST)

    release.join()
    assert [r.range for r in server.gets(WEIGHTS_PATH)] == [None, None]
    assert path.read_bytes() == WEIGHTS_BYTES


def test_gives_up_after_retries(server):
    server.fail[WEIGHTS_PATH] = 10

    with pytest.raises(DownloadError, match=r"after 3 failed attempts in a row: .*HTTP 500"):
        fetch(MODEL, WEIGHTS, host=server.base_url, retries=2, **FAST)

    assert len(server.gets(WEIGHTS_PATH)) == 3


def test_partial_kept_after_giving_up_is_resumed_next_run(server):
    server.drop_after[WEIGHTS_PATH] = 100_000
    part = Path(f"{cached_path(MODEL, WEIGHTS)}.part")

    with pytest.raises(DownloadError, match=f"100000 bytes are kept in {part}; run again to resume"):
        fetch(MODEL, WEIGHTS, host=server.base_url, retries=0, **FAST)
    assert part.read_bytes() == WEIGHTS_BYTES[:100_000]

    assert fetch(MODEL, WEIGHTS, host=server.base_url, sha256=WEIGHTS_SHA, **FAST).read_bytes() == WEIGHTS_BYTES
    assert [r.range for r in server.gets(WEIGHTS_PATH)] == [None, "bytes=100000-"]


def test_404_names_url_and_is_not_retried(server):
    url = f"{server.base_url}/{MODEL}/missing.pdparams"
    start = time.monotonic()

    with pytest.raises(DownloadError) as info:
        fetch(MODEL, "missing.pdparams", host=server.base_url, backoff=5.0, progress=False)

    assert time.monotonic() - start < 2.0
    assert url in str(info.value) and "404" in str(info.value)
    assert len(server.gets(f"{MODEL}/missing.pdparams")) == 1


def test_reader_never_sees_partial_file(server):
    server.hold = threading.Event()
    dest = cached_path(MODEL, WEIGHTS)
    worker = threading.Thread(target=fetch, args=(MODEL, WEIGHTS), kwargs=dict(host=server.base_url, **FAST))
    worker.start()
    _wait_for(lambda: len(server.gets(WEIGHTS_PATH)) == 1)
    assert not dest.exists()
    server.hold.set()
    worker.join(timeout=10)
    assert dest.read_bytes() == WEIGHTS_BYTES


# The child loads download.py by file path: it needs only the standard library
# and tqdm, and skipping the package import (Paddle) keeps each child ~0.1 s.
_CHILD = """
import importlib, json, logging, sys
dl = importlib.import_module("paddlemix.zoo.download")
assert dl.__file__ == sys.argv[5], (dl.__file__, sys.argv[5])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
path = dl.fetch(sys.argv[1], sys.argv[2], host=sys.argv[3], sha256=sys.argv[4], backoff=0.01, progress=False)
print(json.dumps({"path": str(path), "sha256": dl.file_sha256(path)}))
"""


def test_two_processes_download_once(server, tmp_path):
    # The server holds the body until one process reports waiting on the lock,
    # so the two downloads overlap for certain.
    server.hold = threading.Event()
    logs = [tmp_path / f"child{i}.log" for i in range(2)]
    args = [MODEL, WEIGHTS, server.base_url, WEIGHTS_SHA, dl.__file__]
    children = []
    for log in logs:
        with log.open("w") as stderr:
            children.append(subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, stderr=stderr, text=True))

    def one_waits() -> bool:
        for child, log in zip(children, logs):
            assert child.poll() is None, f"child exited early:\n{log.read_text()}"
        return any("Waiting for another process" in log.read_text() for log in logs)

    _wait_for(one_waits, timeout=60)
    server.hold.set()
    results = [json.loads(child.communicate(timeout=60)[0]) for child in children]

    assert [child.returncode for child in children] == [0, 0]
    assert [r["sha256"] for r in results] == [WEIGHTS_SHA, WEIGHTS_SHA]
    assert {r["path"] for r in results} == {str(cached_path(MODEL, WEIGHTS))}
    assert [(r.range, r.status, r.body_bytes) for r in server.gets(WEIGHTS_PATH)] == [(None, 200, len(WEIGHTS_BYTES))]
    assert sum("Waiting for another process" in log.read_text() for log in logs) == 1


def test_cache_hit_needs_no_network_after_server_stopped(server, monkeypatch):
    host = server.base_url
    path = fetch(MODEL, WEIGHTS, host=host, sha256=WEIGHTS_SHA, **FAST)
    server.stop()

    # Not flagged offline: a verified cache hit still opens no connection.
    assert fetch(MODEL, WEIGHTS, host=host, sha256=WEIGHTS_SHA, retries=0, **FAST) == path
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    assert fetch(MODEL, WEIGHTS, host=host, sha256=WEIGHTS_SHA, **FAST) == path
    assert fetch(MODEL, WEIGHTS, **FAST).read_bytes() == WEIGHTS_BYTES


def test_offline_missing_file_names_file_and_cache_path(server, monkeypatch):
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    dest = cached_path(MODEL, WEIGHTS)

    with pytest.raises(DownloadError) as info:
        fetch(MODEL, WEIGHTS, host=server.base_url, **FAST)

    message = str(info.value)
    assert f"'{WEIGHTS}' of model '{MODEL}'" in message and str(dest) in message
    assert "PADDLEMIX_OFFLINE=1" in message and "copy the file to that path" in message
    with pytest.raises(DownloadError, match=r"offline=True"):
        fetch(MODEL, WEIGHTS, host=server.base_url, offline=True, **FAST)
    assert server.log == []
    # The argument wins over the environment.
    assert fetch(MODEL, WEIGHTS, host=server.base_url, offline=False, **FAST) == dest


def test_offline_refuses_damaged_cache_file(server, monkeypatch):
    path = fetch(MODEL, WEIGHTS, host=server.base_url, **FAST)
    with open(path, "r+b") as fh:
        fh.truncate(10)
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    with pytest.raises(DownloadError, match=r"is corrupt \(sha256 is [0-9a-f]{64}, recorded in"):
        fetch(MODEL, WEIGHTS, **FAST)
    assert len(server.log) == 1


@pytest.mark.parametrize("as_uri", [False, True], ids=["directory", "file-url"])
def test_local_directory_host_works_the_same(home, tmp_path, as_uri):
    mirror = tmp_path / "mirror"
    (mirror / MODEL).mkdir(parents=True)
    (mirror / WEIGHTS_PATH).write_bytes(WEIGHTS_BYTES)
    host = mirror.as_uri() if as_uri else str(mirror)

    path = fetch(MODEL, WEIGHTS, host=host, sha256=WEIGHTS_SHA, **FAST)

    assert path == cached_path(MODEL, WEIGHTS) and path.read_bytes() == WEIGHTS_BYTES
    assert Path(f"{path}.sha256").read_text().startswith(WEIGHTS_SHA)
    with pytest.raises(DownloadError, match=f"{mirror / MODEL / 'absent.bin'} does not exist"):
        fetch(MODEL, "absent.bin", host=host, **FAST)


def test_local_partial_copy_is_resumed(home, tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(WEIGHTS_BYTES)
    dest = tmp_path / "cache" / "weights.bin"
    dest.parent.mkdir()
    Path(f"{dest}.part").write_bytes(WEIGHTS_BYTES[:1234])

    assert download_file(str(source), dest, sha256=WEIGHTS_SHA, **FAST).read_bytes() == WEIGHTS_BYTES


def test_host_argument_beats_environment(server, monkeypatch):
    monkeypatch.setenv("PADDLEMIX_MODEL_HOST", server.base_url)
    assert model_url(MODEL, WEIGHTS) == f"{server.base_url}/{WEIGHTS_PATH}"
    assert model_url(MODEL, WEIGHTS, host="/srv/zoo/") == f"/srv/zoo/{WEIGHTS_PATH}"
    monkeypatch.delenv("PADDLEMIX_MODEL_HOST")
    assert model_url(MODEL, WEIGHTS) == f"{dl.DEFAULT_MODEL_HOST}/{WEIGHTS_PATH}"

    monkeypatch.setenv("PADDLEMIX_MODEL_HOST", "http://127.0.0.1:9/nothing-here")
    assert fetch(MODEL, WEIGHTS, host=server.base_url, **FAST).read_bytes() == WEIGHTS_BYTES
    assert len(server.gets(WEIGHTS_PATH)) == 1
    with pytest.raises(ValueError, match="unsupported scheme"):
        model_url(MODEL, WEIGHTS, host="ftp://mirror/zoo")


def test_cache_root_from_environment_or_home(home, monkeypatch, tmp_path):
    assert cache_dir() == home
    monkeypatch.delenv("PADDLEMIX_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert cache_dir() == tmp_path / "user" / ".cache" / "paddlemix"


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a//b", "a/./b", "a/..", "a\\b", "C:/x", ""])
def test_names_cannot_escape_the_cache(home, bad):
    with pytest.raises(ValueError, match="must be"):
        cached_path(bad, WEIGHTS)
    with pytest.raises(ValueError, match="must be"):
        cached_path(MODEL, bad)
    with pytest.raises(ValueError, match="must be"):
        fetch(MODEL, bad, offline=True)


def test_bad_offline_value_is_rejected(home, monkeypatch):
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="PADDLEMIX_OFFLINE='maybe'"):
        fetch(MODEL, WEIGHTS, **FAST)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
