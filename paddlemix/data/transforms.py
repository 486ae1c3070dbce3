"""Image pre-processing for CLIP-family models, numerically equal to open_clip's ``image_transform``.

Implemented with PIL + numpy only (no torchvision), reproducing torchvision's geometry exactly:

* ``Resize(int)`` scales the shortest side to ``size`` and the other to ``int(size * long / short)``
  (truncation, not rounding), with PIL's antialiased filters;
* ``CenterCrop`` offsets are ``int(round((h - th) / 2))`` (Python's round: ties to even), and images
  smaller than the crop are zero-padded first;
* to-tensor divides uint8 by 255 in float32, then ``(x - mean) / std`` in float32.

As in open_clip, resizing and cropping run on the image in its *original* PIL mode and conversion to RGB
comes last. PIL's filters depend on the mode ('P' and '1' images are always resized nearest-neighbour,
'RGBA' is resized with premultiplied alpha), so converting first would give different pixels.

Every transform returns CHW float32, as a ``paddle.Tensor`` (``output='paddle'``) or a numpy array
(``output='numpy'``, for data-loader workers, which should not create Paddle tensors).
"""
import dataclasses
import logging
import math
import numbers
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
from PIL import Image, ImageOps

__all__ = [
    "AugmentationCfg",
    "CenterCropOrPad",
    "ConvertRGB",
    "ImageTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "Normalize",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "PreprocessCfg",
    "RandomResizedCrop",
    "Resize",
    "ResizeKeepRatio",
    "ToArray",
    "center_crop_or_pad",
    "image_transform",
    "image_transform_v2",
    "merge_preprocess_dict",
    "merge_preprocess_kwargs",
    "shortest_side_size",
]

_logger = logging.getLogger(__name__)

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESIZE_MODES = ("shortest", "longest", "squash")
_OUTPUTS = ("paddle", "numpy")

Size = Union[int, Tuple[int, int]]


def _pair(size: Size, name: str = "size") -> Tuple[int, int]:
    """(height, width) from an int or a 1/2-sequence, as torchvision interprets sizes."""
    if isinstance(size, numbers.Integral):
        pair = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) in (1, 2):
        pair = (int(size[0]), int(size[-1]))
    else:
        raise ValueError(f"{name}={size!r} must be an int or a (height, width) pair.")
    if min(pair) <= 0:
        raise ValueError(f"{name}={size!r} must be positive.")
    return pair


def _check_pil(img: Any, step: str) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(
            f"{step} expects a PIL.Image.Image, got {type(img).__name__}; convert arrays with "
            f"PIL.Image.fromarray(uint8_hwc_array) first."
        )
    return img


def _filter(interpolation: str) -> int:
    if interpolation not in _PIL_FILTERS:
        raise ValueError(f"interpolation={interpolation!r} is not supported; use one of {sorted(_PIL_FILTERS)}.")
    return _PIL_FILTERS[interpolation]


# A shortest-side resize of a 1 x 60000 px strip to 224 would need 13.4 Gpx; refuse instead of
# exhausting memory (no real photo comes near: 4096 x 224 is under 1 Mpx).
MAX_RESIZE_PIXELS = 1 << 26


def _resize(img: Image.Image, height: int, width: int, interpolation: str) -> Image.Image:
    if img.size == (width, height):
        return img
    if height * width > MAX_RESIZE_PIXELS:
        raise ValueError(
            f"resizing a {img.size[0]}x{img.size[1]} image to {width}x{height} needs {height * width} pixels "
            f"(limit {MAX_RESIZE_PIXELS}); its aspect ratio is too extreme for this transform"
        )
    return img.resize((width, height), _filter(interpolation))


def shortest_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """Output (height, width) of torchvision's ``Resize(size)``: the long side is truncated, not rounded."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


class Resize:
    """Resize like torchvision ``Resize``: an int scales the shortest side, a pair sets (height, width)."""

    def __init__(self, size: Size, interpolation: str = "bicubic"):
        _filter(interpolation)
        if isinstance(size, numbers.Integral) and size <= 0:
            raise ValueError(f"size={size!r} must be positive.")
        self.size = int(size) if isinstance(size, numbers.Integral) else _pair(size)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        _check_pil(img, self.__class__.__name__)
        width, height = img.size
        if isinstance(self.size, numbers.Integral):
            out_h, out_w = shortest_side_size(height, width, int(self.size))
        else:
            out_h, out_w = self.size
        return _resize(img, out_h, out_w, self.interpolation)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(size={self.size}, interpolation={self.interpolation})"


class ResizeKeepRatio:
    """Scale so the image fits a (height, width) target on its shortest (``longest=0``) or longest
    (``longest=1``) relative side, keeping the aspect ratio; sides are rounded half-to-even."""

    def __init__(self, size: Size, longest: float = 0.0, interpolation: str = "bicubic"):
        _filter(interpolation)
        if not 0.0 <= float(longest) <= 1.0:
            raise ValueError(f"longest={longest!r} must be in [0, 1] (0: shortest edge, 1: longest edge).")
        self.size = _pair(size)
        self.longest = float(longest)
        self.interpolation = interpolation

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        ratio_h = height / self.size[0]
        ratio_w = width / self.size[1]
        ratio = max(ratio_h, ratio_w) * self.longest + min(ratio_h, ratio_w) * (1.0 - self.longest)
        return round(height / ratio), round(width / ratio)

    def __call__(self, img: Image.Image) -> Image.Image:
        _check_pil(img, self.__class__.__name__)
        width, height = img.size
        return _resize(img, *self.output_size(height, width), self.interpolation)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(size={self.size}, longest={self.longest:.3f}, "
            f"interpolation={self.interpolation})"
        )


def _fill_for(img: Image.Image, fill: int) -> Union[int, Tuple[int, ...]]:
    """Per-band fill in the image's own mode (so 'P' gets a palette index, as torchvision does)."""
    bands = len(img.getbands())
    return int(fill) if bands == 1 else (int(fill),) * bands


def center_crop_or_pad(img: Image.Image, size: Size, fill: int = 0) -> Image.Image:
    """Center crop to (height, width), padding with ``fill`` first on any side that is too small.

    Padding splits the deficit with the extra pixel on the right/bottom; crop offsets round half to
    even, matching torchvision's ``center_crop``.
    """
    crop_h, crop_w = _pair(size)
    width, height = img.size
    if crop_w > width or crop_h > height:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        border = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
        img = ImageOps.expand(img, border=border, fill=_fill_for(img, fill))
        width, height = img.size
        if (width, height) == (crop_w, crop_h):
            return img
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


class CenterCropOrPad:
    """Center crop to ``size``; pads with ``fill_color`` where the image is smaller (letterbox)."""

    def __init__(self, size: Size, fill: int = 0):
        self.size = _pair(size)
        self.fill = int(fill)

    def __call__(self, img: Image.Image) -> Image.Image:
        return center_crop_or_pad(_check_pil(img, self.__class__.__name__), self.size, self.fill)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(size={self.size}, fill={self.fill})"


class RandomResizedCrop:
    """Crop a random area fraction in ``scale`` with aspect ratio (log-uniform) in ``ratio``, then resize.

    Sampling follows torchvision's algorithm (10 attempts, then a central crop clamped to ``ratio``);
    the random numbers come from a ``numpy.random.Generator`` so runs are reproducible. Without ``rng``
    or ``seed`` every process draws its own fresh generator on first use, so forked data-loader
    workers do not repeat each other's crops. A fixed ``seed`` gives every worker the same stream:
    call ``set_rng`` in a ``worker_init_fn`` to decorrelate them.

    ``interpolation='random'`` picks bilinear or bicubic with equal probability per image.
    """

    def __init__(
            self,
            size: Size,
            scale: Tuple[float, float] = (0.08, 1.0),
            ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
            interpolation: str = "bicubic",
            rng: Optional[np.random.Generator] = None,
            seed: Optional[int] = None,
    ):
        self.size = _pair(size)
        scale = (float(scale[0]), float(scale[1]))
        ratio = (float(ratio[0]), float(ratio[1]))
        if not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"scale={scale} must satisfy 0 < min <= max (area fractions, e.g. (0.9, 1.0)).")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={ratio} must satisfy 0 < min <= max (width / height, e.g. (3/4, 4/3)).")
        if interpolation != "random":
            _filter(interpolation)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation
        if rng is not None and seed is not None:
            raise ValueError("Pass either rng or seed to RandomResizedCrop, not both.")
        self._rng: Optional[np.random.Generator] = None
        self._rng_pid: Optional[int] = None
        if rng is not None or seed is not None:
            self.set_rng(rng if rng is not None else np.random.default_rng(seed))

    def set_rng(self, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}.")
        self._rng = rng
        self._rng_pid = None  # user-provided: never replaced

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None or (self._rng_pid is not None and self._rng_pid != os.getpid()):
            self._rng = np.random.default_rng()
            self._rng_pid = os.getpid()
        return self._rng

    def get_params(self, height: int, width: int) -> Tuple[int, int, int, int]:
        """Sample (top, left, crop_height, crop_width) for an image of the given size."""
        rng = self.rng
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(rng.integers(0, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                return top, left, crop_h, crop_w
        # Fallback: the largest central crop whose aspect ratio lies within `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            crop_w, crop_h = int(round(height * self.ratio[1])), height
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, img: Image.Image) -> Image.Image:
        _check_pil(img, self.__class__.__name__)
        width, height = img.size
        top, left, crop_h, crop_w = self.get_params(height, width)
        img = img.crop((left, top, left + crop_w, top + crop_h))
        interpolation = self.interpolation
        if interpolation == "random":
            interpolation = "bilinear" if self.rng.integers(0, 2) == 0 else "bicubic"
        return _resize(img, self.size[0], self.size[1], interpolation)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(size={self.size}, scale={self.scale}, "
            f"ratio=({self.ratio[0]:.4f}, {self.ratio[1]:.4f}), interpolation={self.interpolation})"
        )


# Premultiplied-alpha modes have no direct conversion to RGB in PIL.
_UNPREMULTIPLY = {"La": "LA", "RGBa": "RGBA"}


class ConvertRGB:
    """Convert any PIL mode to RGB (alpha is dropped, not composited, as in open_clip)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        _check_pil(img, self.__class__.__name__)
        if img.mode == "RGB":
            return img
        if img.mode in _UNPREMULTIPLY:
            img = img.convert(_UNPREMULTIPLY[img.mode])
        return img.convert("RGB")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


class ToArray:
    """RGB PIL image -> CHW float32 in [0, 1] (uint8 / 255, computed in float32 like torchvision)."""

    def __call__(self, img: Image.Image) -> np.ndarray:
        _check_pil(img, self.__class__.__name__)
        if img.mode != "RGB":
            raise ValueError(f"ToArray expects an RGB image, got mode {img.mode!r}; put ConvertRGB() before it.")
        chw = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
        chw /= np.float32(255.0)
        return chw

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}()"


class Normalize:
    """Per-channel ``(x - mean) / std`` in float32 on a CHW array."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have the same length.")
        if any(s == 0 for s in std):
            raise ValueError(f"std={tuple(std)} contains 0; every channel needs a non-zero std.")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, chw: np.ndarray) -> np.ndarray:
        if chw.ndim != 3 or chw.shape[0] != self._mean.shape[0]:
            raise ValueError(
                f"Normalize expects a CHW array with {self._mean.shape[0]} channels, got shape {chw.shape}."
            )
        chw = chw - self._mean
        chw /= self._std
        return chw

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(mean={self.mean}, std={self.std})"


class ImageTransform:
    """A sequence of steps applied to a PIL image; the last must produce a CHW float32 array.

    ``output='paddle'`` wraps the result in a ``paddle.Tensor``; ``output='numpy'`` returns the array
    (use it inside data-loader workers).
    """

    def __init__(self, steps: List[Any], output: str = "paddle"):
        if output not in _OUTPUTS:
            raise ValueError(f"output={output!r} is not supported; use one of {_OUTPUTS}.")
        self.steps = list(steps)
        self.output = output

    def __call__(self, img: Image.Image) -> Union[paddle.Tensor, np.ndarray]:
        _check_pil(img, self.__class__.__name__)
        for step in self.steps:
            img = step(img)
        if self.output == "paddle":
            return paddle.to_tensor(img)
        return img

    def __repr__(self) -> str:
        lines = [f"{self.__class__.__name__}("]
        lines += [f"    {step!r}" for step in self.steps]
        lines.append(f"    output={self.output}")
        lines.append(")")
        return "\n".join(lines)


@dataclasses.dataclass
class PreprocessCfg:
    """What a pretrained model expects from its images (stored with model configs)."""

    size: Size = 224
    mode: str = "RGB"
    mean: Tuple[float, ...] = OPENAI_DATASET_MEAN
    std: Tuple[float, ...] = OPENAI_DATASET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self):
        if self.mode != "RGB":
            raise ValueError(f"mode={self.mode!r} is not supported; CLIP-family models take 'RGB'.")

    @property
    def num_channels(self) -> int:
        return 3

    @property
    def input_size(self) -> Tuple[int, int, int]:
        return (self.num_channels,) + _pair(self.size)


_PREPROCESS_KEYS = tuple(f.name for f in dataclasses.fields(PreprocessCfg))


def merge_preprocess_dict(base: Union[PreprocessCfg, Dict[str, Any]], overlay: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``base`` (a cfg or dict) updated with the non-None preprocess keys of ``overlay``; other keys dropped."""
    merged = dataclasses.asdict(base) if isinstance(base, PreprocessCfg) else dict(base)
    merged = {k: v for k, v in merged.items() if k in _PREPROCESS_KEYS}
    merged.update({k: v for k, v in (overlay or {}).items() if k in _PREPROCESS_KEYS and v is not None})
    return merged


def merge_preprocess_kwargs(base: Union[PreprocessCfg, Dict[str, Any]], **kwargs: Any) -> Dict[str, Any]:
    return merge_preprocess_dict(base, kwargs)


@dataclasses.dataclass
class AugmentationCfg:
    """Training augmentation: RandomResizedCrop area fraction ``scale`` and aspect ``ratio`` (None = 3/4..4/3).

    open_clip's other options (color jitter, random erasing, timm pipelines) are not implemented; asking
    for them raises instead of silently training without them.
    """

    scale: Tuple[float, float] = (0.9, 1.0)
    ratio: Optional[Tuple[float, float]] = None


# open_clip AugmentationCfg fields that this module does not implement; accepted only when unset.
_UNSUPPORTED_AUG = ("color_jitter", "re_prob", "re_count", "use_timm", "color_jitter_prob", "gray_scale_prob")


def _aug_cfg(aug_cfg: Union[None, Dict[str, Any], AugmentationCfg]) -> AugmentationCfg:
    if aug_cfg is None:
        return AugmentationCfg()
    if isinstance(aug_cfg, AugmentationCfg):
        return aug_cfg
    if not isinstance(aug_cfg, dict):
        raise TypeError(f"aug_cfg must be a dict or AugmentationCfg, got {type(aug_cfg).__name__}.")
    supported = {f.name for f in dataclasses.fields(AugmentationCfg)}
    unknown = sorted(k for k in aug_cfg if k not in supported and k not in _UNSUPPORTED_AUG)
    if unknown:
        raise ValueError(f"Unknown aug_cfg keys {unknown}; supported: {sorted(supported)}.")
    requested = sorted(k for k in _UNSUPPORTED_AUG if aug_cfg.get(k))
    if requested:
        raise ValueError(
            f"aug_cfg {requested} are not implemented in paddlemix (only {sorted(supported)}); remove them."
        )
    return AugmentationCfg(**{k: v for k, v in aug_cfg.items() if k in supported and v is not None})


def _channels(value: Union[float, Sequence[float]], name: str) -> Tuple[float, ...]:
    if isinstance(value, numbers.Real):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name}={value} must have 3 values (one per RGB channel) or be a single float.")
    return value


def image_transform(
        image_size: Size,
        is_train: bool,
        mean: Optional[Union[float, Sequence[float]]] = None,
        std: Optional[Union[float, Sequence[float]]] = None,
        resize_mode: Optional[str] = None,
        interpolation: Optional[str] = None,
        fill_color: int = 0,
        aug_cfg: Union[None, Dict[str, Any], AugmentationCfg] = None,
        output: str = "paddle",
        rng: Optional[np.random.Generator] = None,
        seed: Optional[int] = None,
) -> ImageTransform:
    """Build the train or eval pre-processing of a CLIP-family model (open_clip's ``image_transform``).

    Args:
        image_size: int or (height, width) of the model input.
        is_train: random resized crop (train) or deterministic resize + crop (eval).
        mean, std: per-channel normalisation; default OpenAI CLIP's.
        resize_mode: eval only. 'shortest' (default): shortest side to size, center crop. 'squash': resize
            to exactly size, ignoring aspect. 'longest': longest side to size, pad with ``fill_color``.
        interpolation: 'bicubic' (default), 'bilinear', or 'random' (train: per-image choice of the
            two; eval: bicubic, as in open_clip).
        fill_color: padding value for 'longest', applied in the image's own PIL mode before RGB
            conversion (as open_clip does; for 'P' images it is a palette index).
        aug_cfg: train only; ``AugmentationCfg`` or dict with ``scale`` / ``ratio``.
        output: 'paddle' or 'numpy'.
        rng, seed: train only; the random source of the crop (see ``RandomResizedCrop``).

    Deliberate differences from open_clip 3.3.0, which only matter for non-default interpolation:
    the train crop and the non-square 'shortest' eval resize use ``interpolation``, where open_clip
    always uses bicubic there.
    """
    mean = _channels(OPENAI_DATASET_MEAN if mean is None else mean, "mean")
    std = _channels(OPENAI_DATASET_STD if std is None else std, "std")
    interpolation = interpolation or "bicubic"
    if interpolation not in ("bicubic", "bilinear", "random"):
        raise ValueError(f"interpolation={interpolation!r} is not supported; use 'bicubic', 'bilinear' or 'random'.")
    resize_mode = resize_mode or "shortest"
    if resize_mode not in _RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r} is not supported; use one of {_RESIZE_MODES}.")
    if output not in _OUTPUTS:
        raise ValueError(f"output={output!r} is not supported; use one of {_OUTPUTS}.")
    tail = [ConvertRGB(), ToArray(), Normalize(mean, std)]

    if is_train:
        aug = _aug_cfg(aug_cfg)
        crop = RandomResizedCrop(
            image_size,
            scale=aug.scale,
            ratio=aug.ratio or (3.0 / 4.0, 4.0 / 3.0),
            interpolation=interpolation,
            rng=rng,
            seed=seed,
        )
        return ImageTransform([crop] + tail, output=output)

    if aug_cfg is not None or rng is not None or seed is not None:
        _logger.debug("aug_cfg / rng / seed are ignored by the eval transform.")
    eval_interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"
    height, width = _pair(image_size, "image_size")
    if resize_mode == "longest":
        geometry = [
            ResizeKeepRatio((height, width), longest=1.0, interpolation=eval_interpolation),
            CenterCropOrPad((height, width), fill=fill_color),
        ]
    elif resize_mode == "squash":
        geometry = [Resize((height, width), interpolation=eval_interpolation)]
    elif height == width:
        geometry = [Resize(height, interpolation=eval_interpolation), CenterCropOrPad((height, width))]
    else:
        geometry = [
            ResizeKeepRatio((height, width), longest=0.0, interpolation=eval_interpolation),
            CenterCropOrPad((height, width)),
        ]
    return ImageTransform(geometry + tail, output=output)


def image_transform_v2(
        cfg: PreprocessCfg,
        is_train: bool,
        aug_cfg: Union[None, Dict[str, Any], AugmentationCfg] = None,
        output: str = "paddle",
        rng: Optional[np.random.Generator] = None,
        seed: Optional[int] = None,
) -> ImageTransform:
    """``image_transform`` driven by a model's ``PreprocessCfg``."""
    return image_transform(
        cfg.size,
        is_train=is_train,
        mean=cfg.mean,
        std=cfg.std,
        resize_mode=cfg.resize_mode,
        interpolation=cfg.interpolation,
        fill_color=cfg.fill_color,
        aug_cfg=aug_cfg,
        output=output,
        rng=rng,
        seed=seed,
    )
