"""A built-in, download-free demo dataset: coloured shapes on plain backgrounds, with captions.

The point is a dataset on which a tiny CLIP learns real zero-shot classification in minutes on a
laptop CPU, so the README's first command proves the whole pipeline (data, model, loss, schedule,
zero-shot evaluation) end to end without fetching anything. The task is therefore chosen to be easy
but not trivial: the class is the (colour, shape) pair, so neither colour alone nor shape alone
suffices, and size, small offsets from the centre, rotation, background, colour tint and caption
wording vary as nuisances.

Layout under ``root``::

    train.json                      COCO Karpathy style: [{"caption", "image", "image_id"}]
    images/000000.png ...           train images; paths in train.json are relative to root
    eval/images/<class>/0000.png    held-out ImageFolder set (class folder = "red_circle")
    eval/labels.txt                 class names ("red circle"), in sorted folder order
    eval/templates.txt              zero-shot prompt templates with one "{}" each
    DEMO_COMPLETE.json              parameters + file counts; written last

With the default 4 colours x 4 shapes there are 16 balanced classes, so chance is 1/16 = 6.25 %.
Every caption names exactly the colour and the shape of its picture, so the prompt
"a photo of a red circle." matches the class "red circle".
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from .._util import exclusive_lock, read_lines

__all__ = [
    "COLOURS",
    "SHAPES",
    "DemoPaths",
    "class_names",
    "demo_cache_dir",
    "describe",
    "draw_shape",
    "make_demo_dataset",
    "read_lines",
]

_logger = logging.getLogger(__name__)

MARKER = "DEMO_COMPLETE.json"
# Bump when the pictures or captions change, so existing caches are regenerated.
FORMAT_VERSION = 2

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 30),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star")
# Neutral backgrounds only: a coloured one could be mistaken for the object colour.
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "light grey": (190, 190, 190),
    "grey": (128, 128, 128),
    "dark grey": (70, 70, 70),
    "black": (18, 18, 18),
}

TRAIN_TEMPLATES: Tuple[str, ...] = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}.",
    "a {colour} {shape} in the middle",
    "a {size}{colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a picture of a {size}{colour} {shape}",
    "there is a {colour} {shape} in this image",
    "a drawing of a {colour} {shape}.",
    "{colour} {shape}",
)
# Largest offset of the shape's centre from the picture's centre, as a fraction of the side.
MAX_OFFSET = 0.05
EVAL_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
)

# Per-split salt of the random streams, so train and eval never share a picture.
_SPLIT_SALT = {"train": 1, "eval": 2}
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges make shapes look like photos, not masks


def class_names() -> List[str]:
    """Class names ("red circle", ...) in class-index order (sorted folder names)."""
    return [folder.replace("_", " ") for folder in _class_folders()]


def _class_folders() -> List[str]:
    return sorted(f"{colour}_{shape}" for colour in COLOURS for shape in SHAPES)


def demo_cache_dir() -> Path:
    """Default location: ``<paddlemix cache>/datasets/demo`` (the model zoo's cache root)."""
    from paddlemix.zoo.download import cache_dir

    return cache_dir() / "datasets" / "demo"


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where the pieces of a generated demo dataset are."""

    root: Path
    train_json: Path
    image_root: Path  # the paths in train.json are relative to this
    eval_root: Path
    eval_images: Path  # ImageFolder root: one folder per class
    labels_txt: Path
    templates_txt: Path
    classnames: Tuple[str, ...]
    num_train: int
    num_eval: int

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def chance_top1(self) -> float:
        return 1.0 / len(self.classnames)


# ---------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, radius: float, angle_deg: float) -> List[Tuple[float, float]]:
    if shape == "square":
        # radius is the half side, so squares look as big as circles of the same radius
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(x * radius, y * radius) for x, y in corners]
    elif shape == "triangle":
        # equilateral, pointing up, circumradius slightly above `radius` so its area is comparable
        r = radius * 1.25
        points = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        r_out, r_in = radius * 1.2, radius * 0.5
        points = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_in
            a = math.radians(-90 + 36 * k)
            points.append((r * math.cos(a), r * math.sin(a)))
    else:
        raise ValueError(f"shape={shape!r} has no polygon; use one of {SHAPES}.")
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def draw_shape(
        shape: str,
        colour: Tuple[int, int, int],
        background: Tuple[int, int, int],
        center: Tuple[float, float],
        radius: float,
        angle_deg: float = 0.0,
        image_size: int = 64,
) -> Image.Image:
    """One RGB picture: a filled ``shape`` of ``radius`` (pixels of the output) at ``center``."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not a demo shape; use one of {SHAPES}.")
    k = _SUPERSAMPLE
    big = Image.new("RGB", (image_size * k, image_size * k), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(big)
    cx, cy, r = center[0] * k, center[1] * k, radius * k
    fill = tuple(int(v) for v in colour)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle_deg), fill=fill)
    return big.resize((image_size, image_size), Image.BOX)


@dataclasses.dataclass(frozen=True)
class _Scene:
    colour: str
    shape: str
    background: str
    image: Image.Image
    size: str


def _scene(rng: np.random.Generator, colour: str, shape: str, image_size: int) -> _Scene:
    """Random nuisances (position, size, rotation, background, colour jitter) for one class."""
    radius = float(rng.uniform(0.26, 0.36)) * image_size
    # Offsets stay small: a tiny ViT trained for a few hundred steps has not learned translation
    # invariance yet, and measured zero-shot accuracy after 150 steps fell from 81% (offsets of 4% of
    # the side) to 61% (8%) and 48% (anywhere in the picture).
    margin = radius * 1.25 + 1.0  # stars and triangles reach 1.2-1.25 radius
    half = image_size / 2.0
    reach = max(0.0, min(MAX_OFFSET * image_size, half - margin))
    cx = half + float(rng.uniform(-reach, reach))
    cy = half + float(rng.uniform(-reach, reach))
    angle = float(rng.uniform(-10.0, 10.0))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    jitter = rng.integers(-20, 21, size=3)
    rgb = np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255)
    bg = np.clip(np.asarray(BACKGROUNDS[background]) + rng.integers(-12, 13, size=3), 0, 255)
    image = draw_shape(shape, tuple(rgb), tuple(bg), (cx, cy), radius, angle, image_size)

    size = "small " if radius < 0.29 * image_size else ("big " if radius > 0.33 * image_size else "")
    return _Scene(colour, shape, background, image, size)


def _caption(rng: np.random.Generator, scene: _Scene) -> str:
    template = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
    return template.format(colour=scene.colour, shape=scene.shape, size=scene.size, background=scene.background)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One independent stream per picture: the set is the same whatever order it is generated in.
    return np.random.default_rng([int(seed), _SPLIT_SALT[split], int(index)])


def _save_png(image: Image.Image, path: Path) -> None:
    # Fixed encoder settings: same seed -> same bytes.
    image.save(path, format="PNG", optimize=False, compress_level=6)


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------

def _generate(root: Path, num_train: int, num_eval_per_class: int, image_size: int, seed: int) -> Dict:
    folders = _class_folders()
    classes = [tuple(folder.split("_", 1)) for folder in folders]  # (colour, shape)

    (root / "images").mkdir(parents=True)
    records = []
    for i in range(num_train):
        colour, shape = classes[i % len(classes)]  # balanced classes
        rng = _rng(seed, "train", i)
        scene = _scene(rng, colour, shape, image_size)
        rel = f"images/{i:06d}.png"
        _save_png(scene.image, root / rel)
        records.append({"caption": _caption(rng, scene), "image": rel, "image_id": f"demo_{i:06d}"})
    with open(root / "train.json", "w", encoding="utf-8") as f:
        json.dump(records, f, indent=0)

    eval_images = root / "eval" / "images"
    for c, (folder, (colour, shape)) in enumerate(zip(folders, classes)):
        (eval_images / folder).mkdir(parents=True)
        for j in range(num_eval_per_class):
            scene = _scene(_rng(seed, "eval", c * num_eval_per_class + j), colour, shape, image_size)
            _save_png(scene.image, eval_images / folder / f"{j:04d}.png")
    (root / "eval" / "labels.txt").write_text("\n".join(class_names()) + "\n", encoding="utf-8")
    (root / "eval" / "templates.txt").write_text("\n".join(EVAL_TEMPLATES) + "\n", encoding="utf-8")

    return {
        "format_version": FORMAT_VERSION,
        "num_train": num_train,
        "num_eval_per_class": num_eval_per_class,
        "image_size": image_size,
        "seed": seed,
        "num_classes": len(folders),
    }


def _paths(root: Path, params: Dict) -> DemoPaths:
    names = tuple(class_names())
    return DemoPaths(
        root=root,
        train_json=root / "train.json",
        image_root=root,
        eval_root=root / "eval",
        eval_images=root / "eval" / "images",
        labels_txt=root / "eval" / "labels.txt",
        templates_txt=root / "eval" / "templates.txt",
        classnames=names,
        num_train=params["num_train"],
        num_eval=params["num_eval_per_class"] * len(names),
    )


def _is_complete(root: Path, params: Dict) -> bool:
    """The marker matches the request and every promised file exists (a cheap stat per file)."""
    try:
        with open(root / MARKER, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    if any(marker.get(k) != v for k, v in params.items()):
        return False
    paths = _paths(root, params)
    if not (paths.train_json.is_file() and paths.labels_txt.is_file() and paths.templates_txt.is_file()):
        return False
    expected = [root / f"images/{i:06d}.png" for i in range(params["num_train"])]
    expected += [
        paths.eval_images / folder / f"{j:04d}.png"
        for folder in _class_folders() for j in range(params["num_eval_per_class"])
    ]
    return all(p.is_file() for p in expected)


def make_demo_dataset(
        root: Union[str, os.PathLike, None] = None,
        num_train: int = 3200,
        num_eval_per_class: int = 20,
        image_size: int = 64,
        seed: int = 0,
) -> DemoPaths:
    """Generate the demo dataset under ``root`` (default ``demo_cache_dir()``) unless already there.

    Idempotent and safe under concurrent first use: generation happens in a sibling temporary folder
    under a file lock and is renamed into place only when complete, so ``root`` is either absent,
    complete, or a stale complete set (other parameters) that is replaced. A non-empty ``root`` that
    is not a demo dataset is never deleted.

    Args:
        root: output folder.
        num_train: train pictures (one caption each), spread evenly over the 16 classes.
        num_eval_per_class: held-out pictures per class.
        image_size: side in pixels (square pictures).
        seed: the same seed gives byte-identical files.
    """
    root = Path(root).expanduser() if root is not None else demo_cache_dir()
    if num_train < 1 or num_eval_per_class < 1:
        raise ValueError(
            f"num_train={num_train} and num_eval_per_class={num_eval_per_class} must both be >= 1."
        )
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw recognisable shapes; use >= 16.")
    params = {
        "format_version": FORMAT_VERSION,
        "num_train": int(num_train),
        "num_eval_per_class": int(num_eval_per_class),
        "image_size": int(image_size),
        "seed": int(seed),
        "num_classes": len(COLOURS) * len(SHAPES),
    }
    if _is_complete(root, params):
        return _paths(root, params)

    # Serialise generation between processes (e.g. all ranks of a launch asking on first use).
    with exclusive_lock(root.parent / f".{root.name}.lock", f"generating the demo dataset at {root}"):
        if _is_complete(root, params):  # another process finished while we waited
            return _paths(root, params)
        if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
            raise FileExistsError(
                f"{root} exists, is not empty and is not a paddlemix demo dataset (no {MARKER}); "
                f"pass an empty or new folder as root."
            )
        for stale in root.parent.glob(f".{root.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of an interrupted run (we hold the lock)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
        try:
            written = _generate(tmp, params["num_train"], params["num_eval_per_class"], params["image_size"],
                                params["seed"])
            with open(tmp / MARKER, "w", encoding="utf-8") as f:
                json.dump(written, f, indent=1, sort_keys=True)
            if root.exists():
                shutil.rmtree(root)  # a demo dataset with other parameters, or an incomplete one
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _logger.info(
        "Generated the demo dataset at %s: %d train pictures, %d x %d eval pictures (chance %.2f%%).",
        root, params["num_train"], params["num_classes"], params["num_eval_per_class"],
        100.0 / params["num_classes"],
    )
    return _paths(root, params)


def describe(paths: DemoPaths) -> str:
    return (
        f"demo dataset at {paths.root}: {paths.num_train} train, {paths.num_eval} eval pictures, "
        f"{paths.num_classes} classes (chance {100 * paths.chance_top1:.2f}% top-1)"
    )
