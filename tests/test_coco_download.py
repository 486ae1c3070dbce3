"""``--task_name coco_karpathy`` without ``--data_root``: PaddleMIX's coco.tar, fetched once from a loopback server.

The archive is a small tar in PaddleMIX's layout (``coco/annotations/coco_karpathy_train.json``,
``coco/images/...``) served by a real HTTP server on 127.0.0.1 that can cut connections and damage bytes.
"""
import hashlib
import io
import json
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image
from zoo_server import ZooServer

import paddlemix.data.coco as coco
from paddlemix.data.sources import build_train_dataset
from paddlemix.data.tokenizer import SimpleTokenizer
from paddlemix.zoo.download import DownloadError

ARCHIVE = "datasets/paddlemix/coco.tar"
N_IMAGES = 6


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)  # noise: ~27 kB each
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _tar(members) -> bytes:
    """``members``: (name, bytes) files, or (name, None, link target) symlinks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, *link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, link[0]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _coco_tar() -> bytes:
    rows = [{"image": f"train2014/{i:03d}.png", "caption": f"caption {i}", "image_id": str(i)} for i in range(N_IMAGES)]
    files = [("coco/annotations/coco_karpathy_train.json", json.dumps(rows).encode())]
    files += [(f"coco/images/train2014/{i:03d}.png", _png(i)) for i in range(N_IMAGES)]
    return _tar(files)


TAR = _coco_tar()
SHA = hashlib.sha256(TAR).hexdigest()


@pytest.fixture
def server():
    with ZooServer({ARCHIVE: TAR}) as s:
        yield s


def _fetch(server, datasets, **kwargs):
    kwargs.setdefault("sha256", SHA)
    return coco.coco_karpathy_root(datasets, url=f"{server.base_url}/{ARCHIVE}", progress=False, **kwargs)


def test_cut_connection_is_resumed_then_extracted_once(server, tmp_path):
    assert len(TAR) > 150_000
    server.drop_after[ARCHIVE] = 100_000
    datasets = tmp_path / "datasets"
    root = _fetch(server, datasets, size=len(TAR))
    assert root == datasets / "coco"
    assert [g.range for g in server.gets(ARCHIVE)] == [None, "bytes=100000-"]  # resumed, not restarted
    assert json.loads((root / "annotations" / "coco_karpathy_train.json").read_text())[2]["caption"] == "caption 2"
    assert (root / "images" / "train2014" / "005.png").read_bytes() == _png(5)
    assert not (datasets / "coco.tar").exists()  # the archive is not kept next to its contents
    stamp = (root / "annotations" / "coco_karpathy_train.json").stat().st_mtime_ns
    # Second call: nothing is fetched or extracted, even offline.
    assert _fetch(server, datasets) == root
    assert coco.coco_karpathy_root(datasets, offline=True) == root
    assert len(server.gets(ARCHIVE)) == 2
    assert (root / "annotations" / "coco_karpathy_train.json").stat().st_mtime_ns == stamp


def test_task_name_coco_karpathy_without_data_root(server, tmp_path, monkeypatch):
    """The seed's default: $PADDLEMIX_HOME/datasets/coco, downloaded on first use."""
    monkeypatch.setenv("PADDLEMIX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PADDLEMIX_OFFLINE", raising=False)
    monkeypatch.setattr(coco, "COCO_URL", f"{server.base_url}/{ARCHIVE}")
    tok = SimpleTokenizer(context_length=16)
    ds = build_train_dataset("coco_karpathy", lambda img: np.asarray(img, np.float32), tok, return_caption=True)
    assert len(ds) == N_IMAGES and ds[3]["caption"] == "caption 3"
    assert (tmp_path / "home" / "datasets" / "coco" / "images" / "train2014" / "003.png").is_file()
    build_train_dataset("coco_karpathy", lambda img: np.asarray(img, np.float32), tok)
    assert len(server.gets(ARCHIVE)) == 1


def test_corrupt_archive_is_refused(server, tmp_path):
    server.corrupt[ARCHIVE] = 2  # damaged twice: the retry from scratch is damaged too
    datasets = tmp_path / "datasets"
    with pytest.raises(DownloadError, match="failed verification twice"):
        _fetch(server, datasets)
    assert not (datasets / "coco").exists() and not (datasets / "coco.tar").exists()
    # Once the host serves good bytes again, the next call succeeds.
    assert _fetch(server, datasets).joinpath("annotations", "coco_karpathy_train.json").is_file()


@pytest.mark.parametrize("members, why", [
    ([("coco/annotations/coco_karpathy_train.json", b"[]"), ("coco/../../escape.txt", b"x")], "unsafe member"),
    ([("coco/annotations/coco_karpathy_train.json", b"[]"), ("coco/images/link", None, "/etc/passwd")], "unsafe member"),
    ([("coco/annotations/coco_karpathy_train.json", b"[]"), ("other/file.txt", b"x")], "outside coco/"),
    ([("coco/images/000.png", b"x")], "has no coco/annotations"),
    ([("coco/annotations/coco_karpathy_train.json", b"[]")], "has no coco/annotations"),  # no images/
    ([("coco/annotations/coco_karpathy_train.json", b"[]")], "not a readable tar"),  # truncated below
])
def test_unsafe_or_foreign_archives_are_not_extracted(tmp_path, members, why):
    data = _tar(members)
    if why == "not a readable tar":
        data = data[:700]
    served = {ARCHIVE: data}
    with ZooServer(served) as server:
        with pytest.raises(DownloadError, match=why):
            _fetch(server, tmp_path / "datasets", sha256=None)
    assert not (tmp_path / "datasets" / "coco").exists()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "datasets" / "coco.tar").exists()
    assert [p.name for p in (tmp_path / "datasets").iterdir() if not p.name.endswith(".lock")] == []


def test_a_copy_paddlemix_extracted_is_used_as_is(server, tmp_path):
    """PaddleMIX's layout under the same datasets folder (PADDLEMIX_HOME=~/.paddlemix) needs no download."""
    root = tmp_path / "datasets" / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "annotations" / "coco_karpathy_train.json").write_text("[]")
    assert _fetch(server, tmp_path / "datasets") == root
    assert server.gets(ARCHIVE) == []


def test_offline_names_the_place_for_the_data(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        coco.coco_karpathy_root(tmp_path / "datasets", offline=True)
    message = str(err.value)
    assert str(tmp_path / "datasets" / "coco") in message and coco.COCO_URL in message
    assert "~/.paddlemix/datasets/coco" in message


def test_concurrent_callers_download_once(server, tmp_path):
    """Every rank of a job asks at once: one downloads and extracts, the others wait for it."""
    server.hold = threading.Event()
    results, errors = [], []

    def call():
        try:
            results.append(_fetch(server, tmp_path / "datasets"))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    server.hold.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert len(server.gets(ARCHIVE)) == 1
