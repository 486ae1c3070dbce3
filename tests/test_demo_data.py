"""The built-in demo dataset: deterministic bytes, the promised layout, captions that name the class."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from paddlemix.data.demo import (
    BACKGROUNDS,
    COLOURS,
    EVAL_TEMPLATES,
    MARKER,
    SHAPES,
    class_names,
    draw_shape,
    make_demo_dataset,
    read_lines,
)

SMALL = dict(num_train=40, num_eval_per_class=2, image_size=32)


def tree_digest(root):
    """sha256 of every file (relative path + bytes) under root."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=3, **SMALL)
    b = make_demo_dataset(tmp_path / "b", seed=3, **SMALL)
    c = make_demo_dataset(tmp_path / "c", seed=4, **SMALL)
    assert tree_digest(a.root) == tree_digest(b.root)
    assert (a.root / "images/000000.png").read_bytes() == (b.root / "images/000000.png").read_bytes()
    assert (a.root / "images/000000.png").read_bytes() != (c.root / "images/000000.png").read_bytes()


def test_layout(tmp_path):
    paths = make_demo_dataset(tmp_path / "demo", **SMALL)
    names = class_names()
    assert len(names) == len(COLOURS) * len(SHAPES) == 16 and paths.num_classes == 16
    assert paths.chance_top1 == 1 / 16
    assert names == sorted(names) and "red circle" in names

    records = json.loads(paths.train_json.read_text())
    assert len(records) == paths.num_train == 40
    assert set(records[0]) == {"caption", "image", "image_id"}
    assert len({r["image_id"] for r in records}) == 40
    for r in records:
        with Image.open(paths.image_root / r["image"]) as img:
            assert img.size == (32, 32) and img.mode == "RGB"

    assert read_lines(paths.labels_txt) == names
    templates = read_lines(paths.templates_txt)
    assert templates == list(EVAL_TEMPLATES) and all(t.count("{}") == 1 for t in templates)
    folders = sorted(os.listdir(paths.eval_images))
    assert [f.replace("_", " ") for f in folders] == names  # label i <-> i-th sorted folder
    for folder in folders:
        assert sorted(os.listdir(paths.eval_images / folder)) == ["0000.png", "0001.png"]
    assert paths.num_eval == 32
    assert json.loads((paths.root / MARKER).read_text())["num_train"] == 40


def dominant_colour(path, background_tolerance=40):
    """Name of the object colour: the mean of pixels far from every background, nearest palette entry."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3)
    corner = pixels[0]  # shapes never touch the corners (margin >= 1.2 radius)
    obj = pixels[np.abs(pixels - corner).max(axis=1) > background_tolerance]
    mean = obj.mean(axis=0)
    return min(COLOURS, key=lambda name: np.sum((np.asarray(COLOURS[name]) - mean) ** 2))


def test_captions_name_the_class_exactly(tmp_path):
    paths = make_demo_dataset(tmp_path / "demo", **SMALL)
    classes = [tuple(name.split(" ")) for name in class_names()]
    assert not set(" ".join(BACKGROUNDS).split()) & set(COLOURS)  # "on a grey background" names no class colour
    for i, r in enumerate(json.loads(paths.train_json.read_text())):
        words = r["caption"].rstrip(".").split()
        colours = [w for w in words if w in COLOURS]
        shapes = [w for w in words if w in SHAPES]
        assert len(colours) == 1 and len(shapes) == 1, r["caption"]
        assert (colours[0], shapes[0]) == classes[i % 16]  # balanced, class = index mod 16
        assert f"{colours[0]} {shapes[0]}" in r["caption"]  # matches the prompt "a photo of a red circle."
        assert dominant_colour(paths.image_root / r["image"]) == colours[0]
    for name in class_names():
        folder = name.replace(" ", "_")
        assert dominant_colour(paths.eval_images / folder / "0001.png") == name.split(" ")[0]


def test_shapes_differ_in_silhouette():
    # Same colour, place and size: the four shapes cover clearly different areas, so the shape is in
    # the pixels and not only in the caption.
    areas = {}
    for shape in SHAPES:
        img = np.asarray(draw_shape(shape, (255, 0, 0), (0, 0, 0), (32, 32), 16, 0.0, 64))
        areas[shape] = int((img[..., 0] > 128).sum())
    assert areas["square"] > areas["circle"] > areas["triangle"] > areas["star"] > 0
    with pytest.raises(ValueError, match="not a demo shape"):
        draw_shape("hexagon", (255, 0, 0), (0, 0, 0), (32, 32), 16)


def test_idempotent_and_self_repairing(tmp_path):
    root = tmp_path / "demo"
    paths = make_demo_dataset(root, **SMALL)
    first = paths.root / "images/000005.png"
    mtime = first.stat().st_mtime_ns
    assert make_demo_dataset(root, **SMALL) == paths
    assert first.stat().st_mtime_ns == mtime  # complete: nothing rewritten

    digest = tree_digest(root)
    first.unlink()  # incomplete -> regenerated, identical
    make_demo_dataset(root, **SMALL)
    assert tree_digest(root) == digest

    bigger = make_demo_dataset(root, **dict(SMALL, num_train=48))  # other parameters -> replaced
    assert len(json.loads(bigger.train_json.read_text())) == 48
    assert not list(tmp_path.glob(".demo.partial-*"))

    foreign = tmp_path / "not_demo"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a paddlemix demo dataset"):
        make_demo_dataset(foreign, **SMALL)
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="image_size"):
        make_demo_dataset(tmp_path / "tiny", num_train=1, num_eval_per_class=1, image_size=8)
