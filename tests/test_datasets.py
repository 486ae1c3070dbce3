"""Training-data sources: every format parses generated data, bad samples are skipped and counted by
reason, the skip threshold stops a run, and (rank, loader worker) readers split streams exactly."""
import base64
import copy
import gzip
import io
import json
import logging
import tarfile
from collections import Counter

import numpy as np
import paddle
import pytest
from PIL import Image

from paddlemix.data.sources import (
    CaptionFileDataset,
    CocoKarpathyDataset,
    LaionFilelistDataset,
    SkipCounter,
    SkippedTooManyError,
    WebDatasetTarDataset,
    assign_parts,
    build_train_dataset,
    decode_image,
    expand_braces,
    expand_shard_pattern,
)
from paddlemix.data.sources.common import SampleError
from paddlemix.data.tokenizer import SimpleTokenizer
from paddlemix.data.transforms import image_transform

CONTEXT = 8


@pytest.fixture(scope="module")
def tok():
    return SimpleTokenizer(context_length=CONTEXT)


def to_array(img):
    """A deterministic, cheap transform: RGB pixels as float32 CHW."""
    return np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1).copy()


def image_bytes(seed=0, size=(8, 8), fmt="PNG"):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def ids_to_caption(tok, captions):
    """input_ids row -> caption, to identify samples that went through a DataLoader."""
    table = {tuple(row): c for row, c in zip(tok.batch_encode(list(captions), CONTEXT), captions)}
    assert len(table) == len(captions)
    return table


# ---------------------------------------------------------------------------------------------------
# Shard patterns
# ---------------------------------------------------------------------------------------------------

def test_expand_braces():
    assert expand_braces("/d/{00000..00003}.tar") == [f"/d/0000{i}.tar" for i in range(4)]
    assert expand_braces("s{8..11}") == ["s8", "s9", "s10", "s11"]
    assert expand_braces("s{1..10..3}") == ["s1", "s4", "s7", "s10"]
    assert expand_braces("s{3..1}") == ["s3", "s2", "s1"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    assert expand_braces("x{a,b{0..1}}y") == ["xay", "xb0y", "xb1y"]
    assert expand_braces("keep{x}.tar") == ["keep{x}.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_shard_pattern("a{0..1}.tar::b.tar") == ["a0.tar", "a1.tar", "b.tar"]
    with pytest.raises(ValueError, match="Unbalanced"):
        expand_braces("a{0..1.tar")


def test_assign_parts_cover_every_record_once():
    # Enough parts: each reader gets whole parts, disjoint, together all of them.
    for num_parts, num_readers in [(7, 4), (4, 4), (9, 2)]:
        taken = []
        for r in range(num_readers):
            parts, offset, stride = assign_parts(num_parts, r, num_readers, seed=3, epoch=1)
            assert (offset, stride) == (0, 1)
            taken += parts
        assert sorted(taken) == list(range(num_parts))
    # Fewer parts than readers: all walk all parts in the same order and keep records k % R == r.
    plans = [assign_parts(2, r, 4, seed=3, epoch=1) for r in range(4)]
    assert all(p[0] == plans[0][0] for p in plans) and sorted(plans[0][0]) == [0, 1]
    assert [(p[1], p[2]) for p in plans] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # The part order is a function of (seed, epoch) only.
    orders = {tuple(assign_parts(50, 0, 1, seed=0, epoch=e)[0]) for e in range(3)}
    assert len(orders) == 3
    assert assign_parts(50, 0, 1, seed=0, epoch=2) == assign_parts(50, 0, 1, seed=0, epoch=2)


# ---------------------------------------------------------------------------------------------------
# Image decoding guards
# ---------------------------------------------------------------------------------------------------

def test_decode_image_guards(tmp_path):
    good = image_bytes(size=(8, 6))
    assert decode_image(good).size == (8, 6)
    limit_before = Image.MAX_IMAGE_PIXELS
    cases = {
        "too_large": (good, dict(max_pixels=47)),
        "too_small": (good, dict(min_image_size=7)),
        "corrupt_image": (b"this is not an image", {}),
        "missing_file": (str(tmp_path / "nope.png"), {}),
    }
    for reason, (source, kwargs) in cases.items():
        with pytest.raises(SampleError) as info:
            decode_image(source, **kwargs)
        assert info.value.reason == reason
    with pytest.raises(SampleError) as info:  # header fine, pixel data cut short
        decode_image(image_bytes(size=(64, 64))[:200])
    assert info.value.reason == "corrupt_image"
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the guard is local, PIL's global is untouched


# ---------------------------------------------------------------------------------------------------
# COCO Karpathy JSON
# ---------------------------------------------------------------------------------------------------

def write_coco(root, n, missing=(), corrupt=(), truncated=(), extra_rows=()):
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rel = f"images/{i:03d}.png"
        if i in corrupt:
            (root / rel).write_bytes(b"garbage")
        elif i in truncated:
            (root / rel).write_bytes(image_bytes(i, size=(32, 32))[:100])
        elif i not in missing:
            (root / rel).write_bytes(image_bytes(i, size=(16, 12)))
        records.append({"caption": f"coco {i}", "image": rel, "image_id": i})
    records += list(extra_rows)
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_coco_karpathy_parses(tmp_path, tok):
    path = write_coco(tmp_path, 5)
    transform = image_transform(8, is_train=False, output="numpy")
    ds = CocoKarpathyDataset(str(path), transform, tok, return_caption=True)
    assert len(ds) == 5
    for i in range(5):
        sample = ds[i]
        expected = transform(Image.open(tmp_path / f"images/{i:03d}.png"))
        assert sample["image"].dtype == np.float32 and sample["image"].shape == (3, 8, 8)
        np.testing.assert_array_equal(sample["image"], expected)
        assert sample["input_ids"].dtype == np.int64
        np.testing.assert_array_equal(sample["input_ids"], tok.batch_encode([f"coco {i}"], CONTEXT)[0])
        assert sample["caption"] == f"coco {i}"
    assert ds.skips.counts == {} and ds.skips.good == 5


def test_coco_karpathy_skips_and_replaces(tmp_path, tok):
    extra = [
        {"image": "images/000.png"},  # no caption
        {"image": "images/000.png", "caption": "   "},  # empty caption
        {"caption": "no image"},
        "not an object",
        {"image": "images/001.png", "caption": ["list a", "list b"]},  # val/test style: one entry per caption
    ]
    path = write_coco(tmp_path, 10, missing={2}, corrupt={5}, truncated={6}, extra_rows=extra)
    ds = CocoKarpathyDataset(str(path), to_array, tok, return_caption=True)
    assert ds.parse_skips.counts == {"missing_caption": 2, "bad_row": 2}
    assert len(ds) == 12
    captions = [ds[i]["caption"] for i in range(len(ds))]
    # A bad entry is replaced by the next loadable one; 5 and 6 are both bad, so 5 -> 7.
    assert captions[:10] == ["coco 0", "coco 1", "coco 3", "coco 3", "coco 4", "coco 7", "coco 7", "coco 7",
                             "coco 8", "coco 9"]
    assert captions[10:] == ["list a", "list b"]
    # 6 tried once from index 5 and once from index 6.
    assert ds.skips.counts == {"missing_file": 1, "corrupt_image": 3}
    assert ds.skips.good == 12


def test_map_style_counts_are_shared_with_loader_workers(tmp_path, tok):
    path = write_coco(tmp_path, 12, missing={3, 7})
    ds = CocoKarpathyDataset(str(path), to_array, tok)
    loader = paddle.io.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    seen = sum(batch["image"].shape[0] for batch in loader)
    assert seen == 12
    assert ds.skips.counts == {"missing_file": 2}  # counted in the workers, read in the main process
    assert ds.skips.good == 12


def test_augmentation_is_keyed_by_seed_epoch_and_index(tmp_path, tok):
    path = write_coco(tmp_path, 3)
    for i in range(3):
        (tmp_path / f"images/{i:03d}.png").write_bytes(image_bytes(i, size=(32, 32)))
    transform = image_transform(16, is_train=True, aug_cfg={"scale": (0.3, 1.0)}, output="numpy")
    ds = CocoKarpathyDataset(str(path), transform, tok, seed=7)
    first = ds[1]["image"]
    ds[0], ds[2]  # other draws in between do not matter
    np.testing.assert_array_equal(ds[1]["image"], first)
    ds.set_epoch(1)
    assert not np.array_equal(ds[1]["image"], first)
    ds.set_epoch(0)
    np.testing.assert_array_equal(ds[1]["image"], first)


# ---------------------------------------------------------------------------------------------------
# JSONL / CSV
# ---------------------------------------------------------------------------------------------------

def test_jsonl_parses_and_skips(tmp_path, tok):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i))
    lines = [
        json.dumps({"image": "0.png", "caption": "jsonl 0"}).encode(),
        json.dumps({"filepath": "1.png", "title": "jsonl 1"}).encode(),  # open_clip's column names
        b"",  # blank lines are not samples
        b'{"image": "2.png", "caption": ',  # truncated JSON
        b'{"image": "2.png", "caption": "caf\xe9"}',  # latin-1, not UTF-8
        b"[1, 2]",
        json.dumps({"image": "2.png"}).encode(),
        json.dumps({"caption": "no image"}).encode(),
        json.dumps({"image": "3.png", "caption": "jsonl 3"}).encode(),
        json.dumps({"image": "missing.png", "caption": "gone"}).encode(),
    ]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    ds = CaptionFileDataset(str(path), to_array, tok, return_caption=True)
    assert ds.parse_skips.counts == {"bad_json": 2, "bad_utf8": 1, "missing_caption": 1, "bad_row": 1}
    assert len(ds) == 4
    assert [ds[i]["caption"] for i in range(4)] == ["jsonl 0", "jsonl 1", "jsonl 3", "jsonl 0"]
    assert ds.skips.counts == {"missing_file": 1}
    np.testing.assert_array_equal(ds[1]["image"], to_array(Image.open(tmp_path / "1.png")))

    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"img": "0.png", "text": "custom"}) + "\n")
    ds = CaptionFileDataset(str(custom), to_array, tok, image_key="img", caption_key="text", return_caption=True)
    assert ds[0]["caption"] == "custom"


@pytest.mark.parametrize("separator", [",", "\t"])
def test_csv_parses_and_skips(tmp_path, tok, separator):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(image_bytes(i))
    s = separator
    rows = [
        f"filepath{s}title",
        f"0.png{s}csv zero",
        f'1.png{s}"quoted{s} caption"',
        f"2.png{s}",  # empty caption
        "only-one-field",
        f"2.png{s}csv two{s}extra",
    ]
    data = ("\n".join(rows[:3]) + "\n").encode() + f"2.png{s}caf".encode() + b"\xe9\n" + ("\n".join(rows[3:]) + "\n").encode()
    path = tmp_path / "data.csv"
    path.write_bytes(data)
    ds = CaptionFileDataset(str(path), to_array, tok, image_root=str(images), return_caption=True)
    assert ds.parse_skips.counts == {"bad_utf8": 1, "missing_caption": 1, "bad_row": 2}
    assert [ds[i]["caption"] for i in range(len(ds))] == ["csv zero", f"quoted{s} caption"]
    with pytest.raises(ValueError, match="lacks an image column"):
        CaptionFileDataset(str(path), to_array, tok, image_key="path")


# ---------------------------------------------------------------------------------------------------
# PaddleMIX LAION filelist
# ---------------------------------------------------------------------------------------------------

def laion_line(caption_json, image, columns=6):
    cols = ["id", "url", caption_json, "w", "h", image][:columns]
    return "\t".join(cols).encode("utf-8")


def b64(data):
    return base64.b64encode(data).decode()


def write_laion_parts(root, num_parts, per_part, prefix="laion"):
    """Clean parts (alternating plain / gzip); returns (filelist path, all captions)."""
    names, captions = [], []
    for p in range(num_parts):
        lines = []
        for i in range(per_part):
            caption = f"{prefix} {p} {i}"
            captions.append(caption)
            lines.append(laion_line(json.dumps({"caption_en": caption}), b64(image_bytes(p * 100 + i))))
        name = f"part-{p:03d}.txt" + (".gz" if p % 2 else "")
        data = b"\n".join(lines) + b"\n"
        (root / name).write_bytes(gzip.compress(data, mtime=0) if p % 2 else data)
        names.append(name)
    filelist = root / "train.filelist"
    filelist.write_text("\n".join(names) + "\n")
    return filelist, captions


def test_laion_parses_and_skips(tmp_path, tok):
    good = b64(image_bytes(1))
    lines = [
        laion_line(json.dumps({"caption_en": "laion a", "blip_caption_en": "unused"}), good),
        laion_line(json.dumps({"blip_caption_en": "laion blip"}), good),  # fallback
        laion_line(json.dumps({"caption_en": "", "blip_caption_en": "laion empty en"}), good),
        b"",
        laion_line(json.dumps({"caption_en": "x"}), "@@not-base64@@"),
        laion_line(json.dumps({"caption_en": "x"}), b64(b"valid base64, not an image")),
        laion_line(json.dumps({"caption_en": "x"}), b64(image_bytes(2)[:60])),  # truncated image
        laion_line(json.dumps({"caption_en": "x"}), b64(image_bytes(3, size=(4, 4)))),  # PaddleMIX min size 5
        laion_line("{not json", good),
        laion_line(json.dumps({"other": "x"}), good),
        laion_line(json.dumps(["a", "list"]), good),
        laion_line(json.dumps({"caption_en": "x"}), good, columns=4),
        laion_line(json.dumps({"caption_en": "caf"}), good).replace(b"caf", b"caf\xe9"),
    ]
    (tmp_path / "part-0.txt").write_bytes(b"\n".join(lines[:6]) + b"\n")
    (tmp_path / "part-1.txt.gz").write_bytes(gzip.compress(b"\r\n".join(lines[6:]) + b"\r\n"))
    filelist = tmp_path / "list.txt"
    filelist.write_text("part-0.txt\n\npart-1.txt.gz\nmissing-part.txt\n")
    ds = LaionFilelistDataset(str(filelist), to_array, tok, shuffle=False, return_caption=True)
    samples = list(ds)
    assert [s["caption"] for s in samples] == ["laion a", "laion blip", "laion empty en"]
    np.testing.assert_array_equal(samples[0]["image"], to_array(Image.open(io.BytesIO(image_bytes(1)))))
    np.testing.assert_array_equal(samples[0]["input_ids"], tok.batch_encode(["laion a"], CONTEXT)[0])
    assert ds.skips.counts == {
        "bad_base64": 1, "corrupt_image": 2, "too_small": 1, "bad_json": 2, "missing_caption": 1, "bad_row": 1,
        "bad_utf8": 1, "missing_file": 1,
    }
    # A part file given directly (its first line is a record) is a one-part list.
    single = LaionFilelistDataset(str(tmp_path / "part-0.txt"), to_array, tok, shuffle=False, return_caption=True)
    assert single.parts == [str(tmp_path / "part-0.txt")]
    assert [s["caption"] for s in single] == ["laion a", "laion blip", "laion empty en"]


def test_laion_column_indices_are_configurable(tmp_path, tok):
    line = "\t".join([json.dumps({"caption_en": "moved"}), b64(image_bytes(0))]).encode()
    (tmp_path / "p.txt").write_bytes(line + b"\n")
    ds = LaionFilelistDataset([str(tmp_path / "p.txt")], to_array, tok, text_column=0, image_column=1,
                              return_caption=True)
    assert [s["caption"] for s in ds] == ["moved"]


# ---------------------------------------------------------------------------------------------------
# webdataset tar shards
# ---------------------------------------------------------------------------------------------------

def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_wds_shards(root, num_shards, per_shard, prefix="wds"):
    captions = []
    for s in range(num_shards):
        members = []
        for i in range(per_shard):
            caption = f"{prefix} {s} {i}"
            captions.append(caption)
            members += [(f"{s:03d}{i:04d}.jpg", image_bytes(s * 100 + i, fmt="JPEG")),
                        (f"{s:03d}{i:04d}.txt", caption.encode())]
        write_tar(root / f"shard-{s:05d}.tar", members)
    return str(root / f"shard-{{00000..{num_shards - 1:05d}}}.tar"), captions


def test_webdataset_parses_and_skips(tmp_path, tok):
    jpg, png, webp = image_bytes(0, fmt="JPEG"), image_bytes(1), image_bytes(2, fmt="WEBP")
    write_tar(tmp_path / "shard-00000.tar", [
        ("dir", None),
        ("a/000.jpg", jpg), ("a/000.txt", b"wds jpg txt"),
        ("a/001.json", json.dumps({"caption": "wds png json", "url": "u"}).encode()), ("a/001.png", png),
        ("a/002.webp", webp), ("a/002.txt", b"wds webp"), ("a/002.json", b'{"caption": "txt wins"}'),
        ("a/003.txt", b"caption without image"),
        ("a/004.jpg", jpg), ("a/004.json", b"{broken"),
        ("a/005.jpg", jpg), ("a/005.txt", b"caf\xe9"),
        ("a/006.jpg", b"not a jpeg"), ("a/006.txt", b"corrupt"),
        ("a/007.jpg", jpg), ("a/007.json", b'{"url": "no caption"}'),
        ("../evil.jpg", jpg), ("../evil.txt", b"escape"),
        ("/abs/x.jpg", jpg), ("/abs/x.txt", b"absolute"),
        ("a/008.JPG", jpg), ("a/008.TXT", b"wds upper case ext"),
    ])
    cut = tmp_path / "cut.tar"
    write_tar(cut, [("b/000.png", png), ("b/000.txt", b"before the cut"), ("b/001.png", image_bytes(3, (64, 64)))])
    cut.write_bytes(cut.read_bytes()[:512 * 4 + len(png) + 600])  # truncated inside b/001.png
    pattern = str(tmp_path / "shard-{00000..00001}.tar") + "::" + str(cut)
    ds = WebDatasetTarDataset(pattern, to_array, tok, shuffle=False, return_caption=True)
    captions = [s["caption"] for s in ds]
    assert captions == ["wds jpg txt", "wds png json", "wds webp", "wds upper case ext", "before the cut"]
    assert ds.skips.counts == {
        "missing_image": 1, "bad_json": 1, "bad_utf8": 1, "corrupt_image": 1, "missing_caption": 1,
        "unsafe_path": 2, "bad_shard": 1, "missing_file": 1,
    }
    assert not (tmp_path.parent / "evil.jpg").exists() and not (tmp_path / "abs").exists()


def test_webdataset_json_caption_key(tmp_path, tok):
    write_tar(tmp_path / "s.tar", [("k.png", image_bytes(0)), ("k.json", b'{"text": "from text"}')])
    ds = WebDatasetTarDataset(str(tmp_path / "s.tar"), to_array, tok, caption_key="text", return_caption=True)
    assert [s["caption"] for s in ds] == ["from text"]


def test_streaming_rejects_missing_and_remote_shards(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="none of the 3 part files"):
        WebDatasetTarDataset(str(tmp_path / "{0..2}.tar"), to_array, tok)
    with pytest.raises(ValueError, match="not a local file"):
        WebDatasetTarDataset("https://host/{0..1}.tar", to_array, tok)


# ---------------------------------------------------------------------------------------------------
# Skip threshold
# ---------------------------------------------------------------------------------------------------

def test_skip_counter_threshold():
    counter = SkipCounter(max_skip_fraction=0.25, min_seen=8, name="t")
    for _ in range(6):
        counter.ok()
    counter.skip("bad_json")
    counter.skip("bad_json")  # 2 of 8 = 0.25: not above
    with pytest.raises(SkippedTooManyError, match=r"skipped 3 of 9 samples .*bad_base64=1, bad_json=2"):
        counter.skip("bad_base64")
    with pytest.raises(ValueError, match="Unknown skip reason"):
        SampleError("nonsense")


def test_skip_counter_logs_periodically_and_copies(caplog):
    counter = SkipCounter(log_every=4, name="t")
    with caplog.at_level(logging.INFO, logger="paddlemix.data.sources.common"):
        counter.skip("bad_json", "line 1")
        for _ in range(3):
            counter.ok()
    assert "t: skipping a sample (bad_json) line 1" in caplog.text
    assert "t: skipped 1 of 4 samples (25.00%; bad_json=1)" in caplog.text
    clone = copy.deepcopy(counter)  # outside process creation: a private snapshot, not shared memory
    clone.ok()
    assert (clone.good, clone.counts, counter.good) == (4, {"bad_json": 1}, 3)


def test_threshold_stops_streaming(tmp_path, tok):
    lines = [laion_line(json.dumps({"caption_en": f"c{i}"}), "%%%") for i in range(30)]
    (tmp_path / "bad.txt").write_bytes(b"\n".join(lines))
    ds = LaionFilelistDataset([str(tmp_path / "bad.txt")], to_array, tok, min_seen=10)
    with pytest.raises(SkippedTooManyError, match=r"skipped 10 of 10 samples .*bad_base64=10"):
        list(ds)


def test_threshold_stops_map_style(tmp_path, tok):
    path = write_coco(tmp_path, 20, missing=set(range(20)))
    ds = CocoKarpathyDataset(str(path), to_array, tok, min_seen=5)
    with pytest.raises(SkippedTooManyError, match=r"missing_file=5"):
        ds[0]
    rows = [json.dumps({"image": "x.png", "caption": "ok"})] * 5 + ["{bad"] * 15
    (tmp_path / "bad.jsonl").write_text("\n".join(rows))
    with pytest.raises(SkippedTooManyError, match=r"skipped 15 of 20 .*bad_json=15"):
        CaptionFileDataset(str(tmp_path / "bad.jsonl"), to_array, tok, min_seen=10)


# ---------------------------------------------------------------------------------------------------
# Sharding over ranks x loader workers, epoch reshuffle
# ---------------------------------------------------------------------------------------------------

def read_rank(ds, tok_table):
    loader = paddle.io.DataLoader(ds, batch_size=3, num_workers=2)
    captions = []
    for batch in loader:
        captions += [tok_table[tuple(row)] for row in batch["input_ids"].numpy().tolist()]
    return captions


@pytest.mark.parametrize("kind,num_parts", [("laion", 6), ("laion", 3), ("wds", 5), ("wds", 1)])
def test_two_ranks_two_workers_read_disjoint_samples(tmp_path, tok, kind, num_parts):
    # 6 / 5 parts >= 4 readers: split by part; 3 / 1 parts < 4 readers: split records round-robin.
    if kind == "laion":
        source, captions = write_laion_parts(tmp_path, num_parts, per_part=7)
        make = lambda rank: LaionFilelistDataset(str(source), to_array, tok, rank=rank, world_size=2, seed=5,
                                                 shuffle_buffer=4)
    else:
        source, captions = write_wds_shards(tmp_path, num_parts, per_shard=7)
        make = lambda rank: WebDatasetTarDataset(source, to_array, tok, rank=rank, world_size=2, seed=5,
                                                 shuffle_buffer=4)
    table = ids_to_caption(tok, captions)
    per_rank = []
    for epoch in range(2):
        datasets = [make(rank) for rank in range(2)]
        for ds in datasets:
            ds.set_epoch(epoch)
        per_rank = [read_rank(ds, table) for ds in datasets]
        assert all(per_rank), "every rank gets data"
        everything = per_rank[0] + per_rank[1]
        assert len(everything) == len(captions)  # no sample twice ...
        assert sorted(everything) == sorted(captions)  # ... and none missing, in every epoch
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert sum(ds.skips.good for ds in datasets) == len(captions)


def test_epoch_reshuffles_order_not_set(tmp_path, tok):
    source, captions = write_laion_parts(tmp_path, 4, per_part=6)
    ds = LaionFilelistDataset(str(source), to_array, tok, seed=1, shuffle_buffer=5, return_caption=True)
    order = lambda: [s["caption"] for s in ds]
    epoch0 = order()
    assert order() == epoch0  # deterministic
    ds.set_epoch(1)
    epoch1 = order()
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0) == sorted(captions)
    unshuffled = LaionFilelistDataset(str(source), to_array, tok, shuffle=False, return_caption=True)
    assert [s["caption"] for s in unshuffled] == captions


# ---------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------

def test_build_train_dataset_dispatch(tmp_path, tok, monkeypatch):
    coco_root = tmp_path / "coco"
    write_coco(coco_root / "images", 2)
    (coco_root / "annotations").mkdir()
    # LAVIS/PaddleMIX layout: annotations/coco_karpathy_train.json, image paths relative to images/
    (coco_root / "images" / "train.json").rename(coco_root / "annotations" / "coco_karpathy_train.json")
    ds = build_train_dataset("coco_karpathy", to_array, tok, data_root=str(coco_root), return_caption=True)
    assert isinstance(ds, CocoKarpathyDataset) and ds[1]["caption"] == "coco 1"

    json_path = write_coco(tmp_path / "flat", 2)
    assert isinstance(build_train_dataset(str(json_path), to_array, tok), CocoKarpathyDataset)
    jsonl = tmp_path / "flat" / "d.jsonl"
    jsonl.write_text(json.dumps({"image": "images/000.png", "caption": "x"}) + "\n")
    assert isinstance(build_train_dataset(str(jsonl), to_array, tok), CaptionFileDataset)
    filelist, _ = write_laion_parts(tmp_path, 2, per_part=2)
    laion = build_train_dataset(str(filelist), to_array, tok, rank=1, world_size=2, seed=9)
    assert isinstance(laion, LaionFilelistDataset) and (laion.rank, laion.world_size, laion.seed) == (1, 2, 9)
    pattern, _ = write_wds_shards(tmp_path, 2, per_shard=1)
    assert isinstance(build_train_dataset(pattern, to_array, tok), WebDatasetTarDataset)

    # No data_root: PaddleMIX's archive from the cache; offline and absent, the error names where it goes.
    monkeypatch.setenv("PADDLEMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=f"not at {tmp_path / 'home' / 'datasets' / 'coco'} and offline"):
        build_train_dataset("coco_karpathy", to_array, tok)
    with pytest.raises(ValueError, match="not a known kind of training data"):
        build_train_dataset("imagenet", to_array, tok)
    with pytest.raises(ValueError, match="non-tar"):
        build_train_dataset(str(tmp_path / "{a,b}.zip"), to_array, tok)


def test_build_train_dataset_demo(tmp_path, tok):
    ds = build_train_dataset("demo", image_transform(16, is_train=True, output="numpy"), tok,
                             data_root=str(tmp_path / "demo"), demo_options=dict(num_train=32, num_eval_per_class=1),
                             return_caption=True)
    assert len(ds) == 32
    sample = ds[5]
    assert sample["image"].shape == (3, 16, 16) and sample["input_ids"].shape == (CONTEXT,)
    assert Counter(word in sample["caption"] for word in ("red", "green", "blue", "yellow"))[True] == 1
