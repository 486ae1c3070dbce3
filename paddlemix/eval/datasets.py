"""Evaluation data on disk: ImageFolder, CIFAR-10/100 python release, Karpathy retrieval JSON, STS TSV.

Every dataset returns numpy (``transform`` should be built with ``output='numpy'``) so that data
loader workers never create Paddle tensors; the loader collates in the main process.

CIFAR ships as Python pickles. Unpickling an untrusted download with ``pickle.load`` can run any
code, so the files are read by the zoo's restricted unpickler (``zoo/formats/pdparams.py``, the one that
reads weights): it resolves only the few numpy globals an array needs and refuses everything else.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import string
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
from PIL import Image

from .._util import read_lines
from ..zoo.formats import CheckpointError, load_array_pickle
from .imagenet_metadata import CIFAR_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "CifarDataset",
    "ClassificationEvalSet",
    "ImageFolderDataset",
    "ImageListDataset",
    "RetrievalDataset",
    "StsPairs",
    "UnsafePickleError",
    "find_cifar",
    "format_template",
    "list_images",
    "load_classification_eval",
    "load_image",
    "read_lines",
    "read_sts_tsv",
    "restricted_pickle_load",
    "validate_templates",
]

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PathLike = Union[str, os.PathLike]
Transform = Optional[Callable[[Image.Image], Any]]


def load_image(path: PathLike) -> Image.Image:
    """Decode an image fully (so the file handle closes here), naming the file on failure."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot decode image {path}: {e}") from e
    return img


def _apply(transform: Transform, img: Image.Image) -> Any:
    return img if transform is None else transform(img)


def list_images(root: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[str]:
    """Image files under ``root`` (recursive, following links), as sorted relative POSIX paths."""
    root = Path(root)
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        found += [(rel_dir / name).as_posix() for name in filenames if name.lower().endswith(exts)]
    return sorted(found)


_FIELD_NAMES = ("", "0", "c")


def validate_templates(templates: Sequence[str], source: str = "templates") -> List[str]:
    """Templates need exactly one ``{}`` (PaddleMIX / OpenAI style) or ``{c}`` (CLIP_benchmark style) field."""
    templates = list(templates)
    if not templates:
        raise ValueError(f"{source}: no templates given")
    for t in templates:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError as e:
            raise ValueError(f"{source}: template {t!r} is not a valid format string ({e}); write braces as {{{{ }}}}") from e
        if len(fields) != 1 or fields[0] not in _FIELD_NAMES:
            raise ValueError(
                f"{source}: template {t!r} must contain exactly one '{{}}' (or '{{c}}') where the class name goes"
            )
    return templates


def format_template(template: str, classname: str) -> str:
    return template.format(classname, c=classname)


@dataclasses.dataclass
class ClassificationEvalSet:
    """A classification dataset plus the text side of its zero-shot classifier."""

    name: str
    dataset: Any
    classnames: List[str]
    templates: List[str]
    root: Path


class ImageFolderDataset(paddle.io.Dataset):
    """``root/<class>/**/<image>`` with classes indexed in sorted folder-name order (torchvision's rule)."""

    def __init__(self, root: PathLike, transform: Transform = None, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{self.root} has no class sub-folders; expected {self.root}/<class>/<image files>")
        self.samples: List[Tuple[str, int]] = []
        empty = []
        for idx, cls in enumerate(self.classes):
            files = list_images(self.root / cls, extensions)
            if not files:
                empty.append(cls)
            self.samples += [(str(self.root / cls / f), idx) for f in files]
        if empty:
            raise FileNotFoundError(
                f"{len(empty)} class folder(s) of {self.root} hold no images with extensions {tuple(extensions)}: "
                f"{empty[:5]}"
            )
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return _apply(self.transform, load_image(path)), np.int64(label)


class ImageListDataset(paddle.io.Dataset):
    """Every image under a folder, in sorted relative-path order; items are ``(image, index)``."""

    def __init__(self, root: PathLike, transform: Transform = None, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        super().__init__()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = list_images(self.root, extensions)
        if not self.files:
            raise FileNotFoundError(f"no images with extensions {tuple(extensions)} under {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return _apply(self.transform, load_image(self.root / self.files[index])), np.int64(index)


# ----------------------------------------------------------------------------- CIFAR


# Read by the zoo's restricted unpickler: the same allow-list, limits and error as weights files.
UnsafePickleError = CheckpointError


def restricted_pickle_load(path: PathLike) -> Any:
    """Plain containers and numpy arrays from a pickle; any other global is refused with a ``CheckpointError``.

    Strings from Python 2 pickles (the CIFAR release was written by Python 2) are read as latin1,
    which maps every 8-bit string back to the same bytes.
    """
    return load_array_pickle(path, python2=True)


def _get(d: Dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(f"{path}: missing key {key!r}; keys present: {sorted(map(str, d))[:10]}")


# (folder name in the release tarball, data file, meta file, label key, class-name key)
_CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", "test_batch", "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", "test", "meta", "fine_labels", "fine_label_names"),
}


def find_cifar(path: PathLike) -> Optional[Tuple[str, Path]]:
    """``(variant, folder)`` when ``path`` is (or contains) an extracted CIFAR python release."""
    path = Path(path)
    for variant, (folder, data_file, meta_file, _, _) in _CIFAR_LAYOUTS.items():
        for candidate in (path, path / folder):
            if (candidate / data_file).is_file() and (candidate / meta_file).is_file():
                return variant, candidate
    return None


class CifarDataset(paddle.io.Dataset):
    """The CIFAR-10 / CIFAR-100 test split from the python-pickle release (``cifar-10-batches-py/``).

    Class names come from the meta file; CIFAR-100's ``aquarium_fish`` becomes ``aquarium fish``
    as in CLIP_benchmark. Images are kept as one uint8 array [N, 32, 32, 3].
    """

    def __init__(self, root: PathLike, transform: Transform = None, variant: Optional[str] = None):
        super().__init__()
        found = find_cifar(root)
        if found is None or (variant is not None and found[0] != variant):
            want = [variant] if variant else list(_CIFAR_LAYOUTS)
            expected = ", ".join(f"{_CIFAR_LAYOUTS[v][0]}/{_CIFAR_LAYOUTS[v][1]} + {_CIFAR_LAYOUTS[v][2]}" for v in want)
            raise FileNotFoundError(f"{root} is not an extracted CIFAR python release; expected {expected}")
        self.variant, self.root = found
        _, data_file, meta_file, label_key, names_key = _CIFAR_LAYOUTS[self.variant]
        batch = restricted_pickle_load(self.root / data_file)
        meta = restricted_pickle_load(self.root / meta_file)
        data = np.asarray(_get(batch, "data", self.root / data_file))
        labels = np.asarray(_get(batch, label_key, self.root / data_file))
        names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in _get(meta, names_key, self.root / meta_file)]
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{self.root / data_file}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self.root / data_file}: expected {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"{self.root / data_file}: labels outside [0, {len(names)}) for {len(names)} class names")
        # Rows are channel-planar (1024 R, 1024 G, 1024 B), each plane row-major.
        self.images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.targets = labels.astype(np.int64)
        self.classes = [n.replace("_", " ") for n in names] if self.variant == "cifar100" else names
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return _apply(self.transform, Image.fromarray(self.images[index], mode="RGB")), self.targets[index]


# ------------------------------------------------------------------- classification entry point


def _class_names_for_folder(classes: List[str], labels_file: Path) -> List[str]:
    if labels_file.is_file():
        names = read_lines(labels_file, "labels")
        if len(names) != len(classes):
            raise ValueError(
                f"{labels_file} lists {len(names)} class names but the image folder has {len(classes)} class "
                f"folders; line i must name the i-th folder in sorted order ({classes[:3]}...)"
            )
        return names
    if len(classes) == len(IMAGENET_CLASSNAMES):
        logger.info("no labels.txt: using the built-in ImageNet-1k class names for %d class folders", len(classes))
        return list(IMAGENET_CLASSNAMES)
    logger.warning("no labels.txt in %s: using the folder names as class names", labels_file.parent)
    return [c.replace("_", " ") for c in classes]


def load_classification_eval(path: PathLike, transform: Transform = None) -> ClassificationEvalSet:
    """Open a ``--classification_eval`` directory.

    Accepted layouts: PaddleMIX's ``DIR/images/<class>/...`` (+ optional ``labels.txt``,
    ``templates.txt``), a bare ``DIR/<class>/...`` folder (e.g. ImageNet val), or an extracted
    CIFAR-10/100 python release. Without ``labels.txt`` a 1000-class folder gets the ImageNet-1k
    names; without ``templates.txt`` the 80 OpenAI ImageNet templates (CIFAR: the 18 CIFAR ones).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"classification eval directory {root} does not exist")
    templates_file = root / "templates.txt"
    cifar = find_cifar(root)
    if cifar is not None:
        dataset = CifarDataset(root, transform)
        classnames = dataset.classes
        if (root / "labels.txt").is_file():
            classnames = _class_names_for_folder(classnames, root / "labels.txt")
        default_templates: Sequence[str] = CIFAR_TEMPLATES
        name = dataset.variant
    else:
        images = root / "images" if (root / "images").is_dir() else root
        dataset = ImageFolderDataset(images, transform)
        classnames = _class_names_for_folder(dataset.classes, root / "labels.txt")
        default_templates = OPENAI_IMAGENET_TEMPLATES
        name = root.name
    if templates_file.is_file():
        templates = validate_templates(read_lines(templates_file, "templates"), str(templates_file))
    else:
        logger.info("no templates.txt in %s: using the %d built-in templates", root, len(default_templates))
        templates = list(default_templates)
    return ClassificationEvalSet(name=name, dataset=dataset, classnames=list(classnames), templates=templates, root=root)


# ----------------------------------------------------------------------------- retrieval


class RetrievalDataset(paddle.io.Dataset):
    """Karpathy-split test JSON (COCO / Flickr30k): ``[{"image": rel_path, "caption": [str, ...]}, ...]``.

    Items are ``(image, image_index)``; captions are in ``self.texts`` with ``self.text_to_image``
    giving each caption's image index. Relative image paths resolve against ``image_root``
    (default: the JSON's folder).
    """

    def __init__(self, annotation_file: PathLike, image_root: Optional[PathLike] = None, transform: Transform = None):
        super().__init__()
        self.annotation_file = Path(annotation_file)
        self.image_root = Path(image_root) if image_root is not None else self.annotation_file.parent
        with open(self.annotation_file, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{self.annotation_file}: expected a non-empty JSON list of {{'image', 'caption'}} objects")
        self.images: List[str] = []
        self.texts: List[str] = []
        text_to_image: List[int] = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "image" not in entry or "caption" not in entry:
                raise ValueError(f"{self.annotation_file}: entry {i} lacks 'image' or 'caption': {str(entry)[:200]}")
            captions = entry["caption"]
            captions = [captions] if isinstance(captions, str) else list(captions)
            if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
                raise ValueError(f"{self.annotation_file}: entry {i} ({entry['image']}) needs non-empty caption strings")
            self.images.append(str(entry["image"]))
            self.texts += captions
            text_to_image += [i] * len(captions)
        self.text_to_image = np.asarray(text_to_image, dtype=np.int64)
        self.transform = transform
        missing = [p for p in self.images if not (self.image_root / p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {self.annotation_file} not found under {self.image_root}, e.g. "
                f"{missing[0]}; pass the folder the 'image' paths are relative to as the image root"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return _apply(self.transform, load_image(self.image_root / self.images[index])), np.int64(index)


# ----------------------------------------------------------------------------- STS


@dataclasses.dataclass
class StsPairs:
    name: str
    sentences1: List[str]
    sentences2: List[str]
    scores: np.ndarray


def read_sts_tsv(path: PathLike) -> StsPairs:
    """Sentence pairs with gold scores from a tab-separated file.

    A header naming ``sentence1``, ``sentence2`` and ``score`` columns is used when present (GLUE
    STS-B and the MTEB TSVs have one); otherwise every line is ``sentence1<TAB>sentence2<TAB>score``.
    Fields are split on tabs only: quotes are part of the sentence.
    """
    path = Path(path)
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: STS file is empty")
    header = [c.strip().lower() for c in rows[0]]
    cols = (0, 1, 2)
    first_row = 1
    if {"sentence1", "sentence2", "score"} <= set(header):
        cols = (header.index("sentence1"), header.index("sentence2"), header.index("score"))
        rows, first_row = rows[1:], 2
    s1, s2, scores = [], [], []
    for lineno, row in enumerate(rows, start=first_row):
        if len(row) <= max(cols):
            raise ValueError(f"{path}: row {lineno} has {len(row)} tab-separated fields, need column {max(cols) + 1}")
        try:
            score = float(row[cols[2]])
        except ValueError as e:
            raise ValueError(f"{path}: row {lineno} score {row[cols[2]]!r} is not a number") from e
        s1.append(row[cols[0]])
        s2.append(row[cols[1]])
        scores.append(score)
    if len(scores) < 2:
        raise ValueError(f"{path}: need at least 2 sentence pairs for a correlation, found {len(scores)}")
    return StsPairs(name=path.stem, sentences1=s1, sentences2=s2, scores=np.asarray(scores, dtype=np.float64))
