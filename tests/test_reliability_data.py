"""Hostile training data never takes a run down.

Property tests (hypothesis) feed the LAION line parser, the webdataset tar reader, the image
decoder and the caption tokenizer with generated records: valid ones, garbage, truncations, bit
flips, JSON of every shape, tar members of every type with absolute and '..' names. Whatever the
input, no exception escapes the sample level, every record ends as a sample or as a skip counted
under a known reason, and the samples that come out are well formed. Explicit cases cover
decompression bombs (a header claiming billions of pixels, a real zlib bomb) in every source.
"""
import base64
import gzip
import io
import json
import os
import struct
import tarfile
import tempfile
import time
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from paddlemix.data.sources import (
    DEFAULT_MAX_PIXELS,
    SKIP_REASONS,
    LaionFilelistDataset,
    SampleError,
    WebDatasetTarDataset,
    decode_image,
)
from paddlemix.data.sources.common import make_sample
from paddlemix.data.tokenizer import SimpleTokenizer
from paddlemix.data.transforms import image_transform

CONTEXT = 8
SIZE = 16
TOKENIZER = SimpleTokenizer(context_length=CONTEXT)
TRANSFORM = image_transform(SIZE, is_train=True, output="numpy", seed=0)
SOT, EOT = TOKENIZER.sot_token_id, TOKENIZER.eot_token_id
# Small enough that mutated headers regularly claim more; the guard must hold at any limit.
FUZZ_MAX_PIXELS = 4096
UNSAFE_MARK = "\u2620unsafe"
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _valid_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    return [
        _encode(rgb, "PNG"),
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "WEBP"),
        _encode(rgb, "BMP"),
        _encode(rgb, "TIFF"),
        _encode(rgb.convert("P"), "GIF"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(rgb.convert("L"), "PNG"),
        _encode(rgb.convert("1"), "PNG"),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)), "PNG"),
        _encode(rgb.convert("F"), "TIFF"),
    ]


VALID_IMAGES = _valid_images()


def _truncate(data: bytes, at: int) -> bytes:
    return data[: at % (len(data) + 1)]


def _flip(data: bytes, flips) -> bytes:
    damaged = bytearray(data)
    for position, mask in flips:
        damaged[position % len(damaged)] ^= mask
    return bytes(damaged)


_flips = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=6)
image_payloads = st.one_of(
    st.sampled_from(VALID_IMAGES),
    st.binary(max_size=80),
    st.builds(_truncate, st.sampled_from(VALID_IMAGES), st.integers(0, 1 << 16)),
    st.builds(_flip, st.sampled_from(VALID_IMAGES), _flips),
)


# For the readers: mostly decodable, so that most records reach the transform and the tokenizer.
reader_images = st.one_of(st.sampled_from(VALID_IMAGES), st.sampled_from(VALID_IMAGES), image_payloads)


def _check_sample(sample):
    assert sample["image"].dtype == np.float32 and sample["image"].shape == (3, SIZE, SIZE)
    assert np.isfinite(sample["image"]).all()
    ids = sample["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (CONTEXT,)
    assert ids[0] == SOT and EOT in ids and ((0 <= ids) & (ids < TOKENIZER.vocab_size)).all()


def _check_counts(ds, samples):
    assert set(ds.skips.counts) <= set(SKIP_REASONS)
    for reason in ds.skips.counts:
        event(f"skipped: {reason}")
    event(f"samples: {min(len(samples), 2)}{'+' if len(samples) >= 2 else ''}")
    assert ds.skips.good == len(samples)
    for sample in samples:
        _check_sample(sample)


# ---------------------------------------------------------------------------------------------------
# Image decoder
# ---------------------------------------------------------------------------------------------------

@FUZZ
@given(image_payloads)
def test_decoder_returns_a_bounded_image_or_a_sample_error(data):
    try:
        img = decode_image(data, max_pixels=FUZZ_MAX_PIXELS)
    except SampleError as e:
        assert e.reason in ("corrupt_image", "too_large", "too_small")
        event(f"decode: {e.reason}")
        return
    event("decode: ok")
    assert img.size[0] * img.size[1] <= FUZZ_MAX_PIXELS
    try:  # the training transform either handles the decoded image or skips it
        sample = make_sample(img, "a caption", TRANSFORM, TOKENIZER, CONTEXT)
    except SampleError as e:
        assert e.reason == "corrupt_image"
        return
    _check_sample(sample)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, idat: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def zlib_bomb_png(side: int) -> bytes:
    """A real ``side`` x ``side`` black PNG: megapixels of data in a few kilobytes."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return _png(side, side, body)


def _patched_size(fmt: str, width: int, height: int) -> bytes:
    """A small valid image whose header claims ``width`` x ``height``."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (200, 10, 10)), fmt))
    if fmt == "GIF":  # logical screen and image descriptor
        struct.pack_into("<HH", data, 6, width, height)
        descriptor = data.index(b",")
        struct.pack_into("<HH", data, descriptor + 5, width, height)
    elif fmt == "BMP":
        struct.pack_into("<ii", data, 18, width, height)
    elif fmt == "JPEG":  # the SOF0 segment: marker, length, precision, height, width
        sof = data.index(b"\xff\xc0")
        struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


HEADER_BOMBS = {
    "png": _png(100_000, 100_000),
    "gif": _patched_size("GIF", 65_535, 65_535),
    "bmp": _patched_size("BMP", 60_000, 60_000),
    "jpeg": _patched_size("JPEG", 65_000, 65_000),
}


@pytest.mark.parametrize("fmt", sorted(HEADER_BOMBS))
def test_header_claiming_billions_of_pixels_is_refused_before_decoding(fmt):
    limit_before = Image.MAX_IMAGE_PIXELS
    start = time.perf_counter()
    with pytest.raises(SampleError) as info:
        decode_image(HEADER_BOMBS[fmt])
    assert info.value.reason == "too_large"
    assert "max_pixels=" in str(info.value) or "decompression bomb" in str(info.value)
    assert time.perf_counter() - start < 1.0  # nothing was decoded
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_zlib_bomb_is_refused_at_the_default_limit_and_small_images_pass():
    side = 9000  # 81 Mpx > DEFAULT_MAX_PIXELS (64 Mpx) and < PIL's own 89 Mpx limit
    assert side * side > DEFAULT_MAX_PIXELS
    bomb = zlib_bomb_png(side)
    assert len(bomb) < 200_000  # ~81 MB of pixels in under 200 kB
    start = time.perf_counter()
    with pytest.raises(SampleError) as info:
        decode_image(bomb)
    assert info.value.reason == "too_large" and f"{side}x{side}" in str(info.value)
    assert time.perf_counter() - start < 1.0
    assert decode_image(zlib_bomb_png(64)).size == (64, 64)


# ---------------------------------------------------------------------------------------------------
# Caption tokenizer
# ---------------------------------------------------------------------------------------------------

captions = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Co", "Cn", "Zs"]), max_size=50),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.from_regex(r"(&[a-z#0-9]{1,8};?| |<\|endoftext\|>|<start_of_text>){1,20}", fullmatch=True),
)


@FUZZ
@given(captions, st.integers(2, 20))
def test_tokenizer_encodes_any_caption(text, context_length):
    ids = TOKENIZER.batch_encode([text], context_length)
    assert ids.dtype == np.int64 and ids.shape == (1, context_length)
    row = ids[0]
    end = int(np.flatnonzero(row == EOT)[-1])
    assert row[0] == SOT and (row[end + 1:] == 0).all()
    assert ((0 <= row) & (row < TOKENIZER.vocab_size)).all()


# ---------------------------------------------------------------------------------------------------
# PaddleMIX LAION part files
# ---------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
caption_json = st.one_of(
    st.builds(lambda c: json.dumps({"caption_en": c}), captions),
    st.builds(lambda c: json.dumps({"caption_en": c}), st.text(max_size=40)),
    st.builds(lambda c, b: json.dumps({"caption_en": c, "blip_caption_en": b}), json_values, captions),
    st.builds(json.dumps, json_values),
    st.text(max_size=30),
)
image_column = st.one_of(
    reader_images.map(lambda b: base64.b64encode(b).decode()),
    reader_images.map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=30),
    st.just(""),
)
cell = st.text(alphabet=st.characters(blacklist_characters="\t\n\r"), max_size=8)


@st.composite
def laion_lines(draw):
    kind = draw(st.sampled_from(["record"] * 6 + ["raw", "mutated"]))
    if kind == "raw":
        return draw(st.binary(max_size=120))
    columns = [draw(cell), draw(cell), draw(caption_json), draw(cell), draw(cell), draw(image_column)]
    if draw(st.integers(0, 5)) == 0:
        columns = columns[: draw(st.integers(1, 5))]
    columns += draw(st.lists(cell, max_size=2))
    line = "\t".join(columns).encode("utf-8", "surrogatepass")
    return draw(st.builds(_flip, st.just(line), _flips)) if kind == "mutated" and line else line


def _records_in(data: bytes) -> int:
    """Records the reader sees: non-blank lines (its own splitting rule)."""
    return sum(1 for line in data.split(b"\n") if line.strip())


@settings(FUZZ, max_examples=70)
@given(st.lists(laion_lines(), max_size=12), st.booleans())
def test_laion_reader_turns_every_line_into_a_sample_or_a_counted_skip(lines, gzipped):
    data = b"\n".join(lines) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / ("part-0.txt.gz" if gzipped else "part-0.txt")
        part.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)
        ds = LaionFilelistDataset([str(part)], TRANSFORM, TOKENIZER, context_length=CONTEXT, shuffle=False,
                                  max_pixels=FUZZ_MAX_PIXELS, max_skip_fraction=1.0, min_seen=1)
        samples = list(ds)
    _check_counts(ds, samples)
    assert ds.skips.seen == _records_in(data)


@settings(FUZZ, max_examples=70)
@given(st.lists(laion_lines(), min_size=1, max_size=8), st.integers(0, 1 << 16), st.booleans())
def test_laion_reader_survives_truncated_parts(lines, cut, gzipped):
    data = b"\n".join(lines) + b"\n"
    raw = gzip.compress(data, mtime=0) if gzipped else data
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / ("part-0.txt.gz" if gzipped else "part-0.txt")
        part.write_bytes(_truncate(raw, cut))
        ds = LaionFilelistDataset([str(part)], TRANSFORM, TOKENIZER, context_length=CONTEXT, shuffle=False,
                                  max_pixels=FUZZ_MAX_PIXELS, max_skip_fraction=1.0, min_seen=1)
        samples = list(ds)
    _check_counts(ds, samples)
    if not gzipped:  # a cut plain file is a shorter file, read to its end
        assert ds.skips.seen == _records_in(_truncate(raw, cut))


def test_laion_bombs_are_skipped_and_the_run_goes_on(tmp_path):
    good = base64.b64encode(VALID_IMAGES[0]).decode()
    bombs = [zlib_bomb_png(2000), *HEADER_BOMBS.values()]
    lines = [f"id\turl\t{json.dumps({'caption_en': f'bomb {i}'})}\tw\th\t{base64.b64encode(b).decode()}"
             for i, b in enumerate(bombs)]
    lines.append(f"id\turl\t{json.dumps({'caption_en': 'after the bombs'})}\tw\th\t{good}")
    (tmp_path / "part.txt").write_text("\n".join(lines) + "\n")
    ds = LaionFilelistDataset([str(tmp_path / "part.txt")], TRANSFORM, TOKENIZER, context_length=CONTEXT,
                              shuffle=False, max_pixels=1_000_000, return_caption=True, max_skip_fraction=1.0)
    assert [s["caption"] for s in ds] == ["after the bombs"]
    assert ds.skips.counts == {"too_large": len(bombs)}


# ---------------------------------------------------------------------------------------------------
# webdataset tar shards
# ---------------------------------------------------------------------------------------------------

SAFE_DIRS = ["", "d/", "d/e/", "./", "d/./"]
# "{outside}" becomes an absolute path next to the shard's folder; none of these may be written.
UNSAFE_DIRS = ["../", "d/../../", "{outside}/", "..\\", "d\\..\\..\\", "C:/", "c:", "../../../../../../tmp/"]
MEMBER_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE,
}


@st.composite
def tar_sample(draw, index: int):
    """The members of one webdataset sample (usually an image and a caption), hostile in many ways."""
    unsafe = draw(st.integers(0, 5)) == 0
    folder = draw(st.sampled_from(UNSAFE_DIRS if unsafe else SAFE_DIRS))
    key = folder + draw(st.sampled_from(["s{}"] * 6 + ["long" * 30 + "{}", "k{}.x"])).format(index)
    members = []
    extensions = draw(st.sampled_from([["jpg", "txt"]] * 4 + [["png", "json"], ["webp", "txt", "json"], ["JPG", "TXT"],
                                      ["txt"], ["jpg"], ["cls", "txt"], ["", "txt"]]))
    for ext in extensions:
        kind = draw(st.sampled_from(["file"] * 50 + [k for k in MEMBER_TYPES if k != "file"]))
        if ext.lower() == "txt":
            text = draw(st.one_of(st.text(min_size=1, max_size=20), captions))
            payload = (UNSAFE_MARK + text if unsafe else text).encode("utf-8", "surrogateescape")
        elif ext == "json":
            value = draw(st.one_of(st.builds(lambda c: {"caption": c}, captions), json_values))
            payload = json.dumps({"caption": UNSAFE_MARK} if unsafe else value).encode()
        else:
            payload = draw(reader_images)
        members.append((f"{key}.{ext}" if ext else key, kind, payload))
    return draw(st.permutations(members)) if draw(st.integers(0, 5)) == 0 else members


@st.composite
def tar_members(draw):
    count = draw(st.integers(0, 6))
    return [m for i in range(count) for m in draw(tar_sample(i))]


def _write_tar(path: Path, members, outside: str, fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name.replace("{outside}", outside))
            info.type = MEMBER_TYPES[kind]
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = "../../outside/target" if kind in ("symlink", "hardlink") else ""
                tar.addfile(info)


def _is_unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or (bool(path.parts) and ":" in path.parts[0])


def _key(name: str) -> str:
    folder, _, filename = name.rpartition("/")
    return f"{folder}/{filename.partition('.')[0]}" if folder else filename.partition(".")[0]


def _expected_groups(members, outside: str):
    """(samples the reader forms, those holding an unsafe member): consecutive regular files by key."""
    groups, key = [], None
    for name, kind, _ in members:
        if kind != "file":
            continue
        name = name.replace("{outside}", outside)
        if _key(name) != key or not groups:
            key = _key(name)
            groups.append(False)
        groups[-1] = groups[-1] or _is_unsafe(name)
    return len(groups), sum(groups)


def _files_under(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@FUZZ
@given(tar_members(), st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       st.sampled_from(["intact", "gzip", "truncated", "flipped"]), st.integers(0, 1 << 16), _flips)
def test_webdataset_reader_never_escapes_never_writes_and_counts_every_sample(members, fmt, damage, cut, flips):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, work, outside = root / "shards", root / "shards" / "work", root / "outside"
        work.mkdir(parents=True)
        shard = shards / "shard-0.tar"
        _write_tar(shard, members, str(outside), fmt)
        data = shard.read_bytes()
        if damage == "gzip":
            data = gzip.compress(data, mtime=0)
        elif damage == "truncated":
            data = _truncate(data, cut)
        elif damage == "flipped":
            data = _flip(data, flips)
        shard.write_bytes(data)
        before = _files_under(root)
        cwd = os.getcwd()
        os.chdir(work)  # relative '..' names would land next to the shard if anything were extracted
        try:
            ds = WebDatasetTarDataset([str(shard)], TRANSFORM, TOKENIZER, context_length=CONTEXT, shuffle=False,
                                      max_pixels=FUZZ_MAX_PIXELS, max_skip_fraction=1.0, min_seen=1,
                                      return_caption=True)
            samples = list(ds)
        finally:
            os.chdir(cwd)
        assert _files_under(root) == before  # nothing written anywhere, in or outside the shard folder
        assert not outside.exists()
    _check_counts(ds, samples)
    assert not any(UNSAFE_MARK in s["caption"] for s in samples)
    if damage in ("intact", "gzip"):
        groups, unsafe = _expected_groups(members, str(outside))
        assert ds.skips.seen == groups
        assert ds.skips.counts.get("unsafe_path", 0) == unsafe


def test_webdataset_bombs_and_oversized_members_are_skipped(tmp_path):
    members = [("a/0.png", "file", zlib_bomb_png(2000)), ("a/0.txt", "file", b"bomb")]
    for i, bomb in enumerate(HEADER_BOMBS.values(), start=1):
        members += [(f"a/{i}.jpg", "file", bomb), (f"a/{i}.txt", "file", b"header bomb")]
    big = _encode(Image.new("RGB", (200, 200)), "BMP")  # 120 kB > 4 bytes x max_pixels: never read
    members += [("a/8.png", "file", big), ("a/8.txt", "file", b"big member"),
                ("a/9.png", "file", VALID_IMAGES[0]), ("a/9.txt", "file", b"after the bombs")]
    _write_tar(tmp_path / "s.tar", members, str(tmp_path / "outside"), tarfile.GNU_FORMAT)
    ds = WebDatasetTarDataset([str(tmp_path / "s.tar")], TRANSFORM, TOKENIZER, context_length=CONTEXT,
                              shuffle=False, max_pixels=20_000, return_caption=True, max_skip_fraction=1.0)
    assert [s["caption"] for s in ds] == ["after the bombs"]
    assert ds.skips.counts == {"too_large": 2 + len(HEADER_BOMBS)}
