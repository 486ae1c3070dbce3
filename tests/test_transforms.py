"""Image transforms: parity with open_clip 3.3.0's image_transform and the train-crop contract."""
import json
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from paddlemix.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    PreprocessCfg,
    RandomResizedCrop,
    center_crop_or_pad,
    image_transform,
    image_transform_v2,
    merge_preprocess_kwargs,
    shortest_side_size,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "transforms")
with open(os.path.join(FIXTURES, "transforms.json"), encoding="utf-8") as _f:
    META = json.load(_f)
CASES = sorted(META["cases"])
IMAGES = META["images"]


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIXTURES, "transforms.npz")) as data:
        return {key: data[key] for key in data.files}


def _open(name):
    with Image.open(os.path.join(FIXTURES, "images", name)) as img:
        img.load()
        return img


def _random_rgb(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _denormalize(chw, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD):
    """Back to 0..255 pixel values (exact integers up to float error)."""
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    return np.rint((chw * std + mean) * 255).astype(np.int64)


@pytest.mark.parametrize("case", CASES)
def test_matches_open_clip(case, expected):
    transform = image_transform(**META["cases"][case], output="numpy")
    errors = {}
    for name in IMAGES:
        out = transform(_open(name))
        ref = expected[f"{case}/{name}"]
        assert out.shape == ref.shape and out.dtype == np.float32
        errors[name] = float(np.abs(out - ref).max())
    # Measured: 0.0 for every case and image (bit-identical).
    assert errors == {name: pytest.approx(0.0, abs=1e-5) for name in IMAGES}


def test_geometry_before_rgb_conversion(expected):
    """open_clip resizes in the original mode: converting palette / RGBA first changes the pixels."""
    transform = image_transform(224, is_train=False, output="numpy")
    for name in ("palette.png", "rgba.png"):
        img = _open(name)
        np.testing.assert_array_equal(transform(img), expected[f"clip_224_val/{name}"])
        assert np.abs(transform(img.convert("RGB")) - expected[f"clip_224_val/{name}"]).max() > 0.5


def test_paddle_and_numpy_outputs_equal():
    img = _random_rgb(97, 131)
    as_paddle = image_transform(64, is_train=False)(img)
    as_numpy = image_transform(64, is_train=False, output="numpy")(img)
    assert isinstance(as_paddle, paddle.Tensor) and as_paddle.dtype == paddle.float32
    assert list(as_paddle.shape) == [3, 64, 64]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.flags.c_contiguous
    np.testing.assert_array_equal(as_paddle.numpy(), as_numpy)


def test_shortest_side_rounding_truncates():
    # torchvision computes the long side as int(size * long / short): 224 * 7 / 3 = 522.67 -> 522.
    assert shortest_side_size(height=3, width=7, size=224) == (224, 522)
    assert shortest_side_size(height=7, width=3, size=224) == (522, 224)
    assert shortest_side_size(height=10, width=10, size=5) == (5, 5)


def test_center_crop_offsets_round_half_to_even():
    columns = np.tile(np.arange(227, dtype=np.uint8), (4, 1))
    # (225 - 224) / 2 = 0.5 -> 0 ; (227 - 224) / 2 = 1.5 -> 2
    assert np.asarray(center_crop_or_pad(Image.fromarray(columns[:, :225]), (4, 224)))[0, 0] == 0
    assert np.asarray(center_crop_or_pad(Image.fromarray(columns), (4, 224)))[0, 0] == 2


def test_center_crop_pads_small_images():
    img = Image.fromarray(np.full((2, 3), 200, dtype=np.uint8))
    out = np.asarray(center_crop_or_pad(img, (5, 6), fill=7))
    expected = np.full((5, 6), 7, dtype=np.uint8)
    expected[1:3, 1:4] = 200  # deficits 3 rows / 3 cols: 1 before, 2 after
    np.testing.assert_array_equal(out, expected)


def test_longest_letterbox():
    img = Image.new("RGB", (100, 50), (255, 255, 255))
    out = image_transform(32, is_train=False, resize_mode="longest", fill_color=128, output="numpy")(img)
    pixels = _denormalize(out)
    assert pixels.shape == (3, 32, 32)
    # 100x50 -> 32x16, padded 8 rows above and below.
    assert (pixels[:, :8] == 128).all() and (pixels[:, 24:] == 128).all()
    assert (pixels[:, 8:24] == 255).all()


def test_non_square_sizes():
    img = _random_rgb(90, 70)
    for mode in ("shortest", "squash", "longest"):
        out = image_transform((48, 32), is_train=False, resize_mode=mode, output="numpy")(img)
        assert out.shape == (3, 48, 32), mode
    assert image_transform((48, 32), is_train=True, seed=0, output="numpy")(img).shape == (3, 48, 32)


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode(mode):
    img = _random_rgb(40, 56, seed=3).convert(mode)
    assert img.mode == mode
    for transform in (image_transform(24, is_train=False, output="numpy"),
                      image_transform(24, is_train=True, seed=0, output="numpy")):
        out = transform(img)
        assert out.shape == (3, 24, 24) and out.dtype == np.float32
        pixels = _denormalize(out)
        assert pixels.min() >= 0 and pixels.max() <= 255
        if mode in ("1", "L", "I", "I;16", "F"):  # single band: the three channels are equal
            assert (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()


def test_train_shape_dtype_and_determinism():
    images = [_random_rgb(120, 160, seed=s) for s in range(4)]
    a = image_transform(64, is_train=True, seed=123, output="numpy")
    b = image_transform(64, is_train=True, rng=np.random.default_rng(123), output="numpy")
    c = image_transform(64, is_train=True, seed=124, output="numpy")
    outs_a = [a(img) for img in images]
    outs_b = [b(img) for img in images]
    outs_c = [c(img) for img in images]
    for x, y, z in zip(outs_a, outs_b, outs_c):
        assert x.shape == (3, 64, 64) and x.dtype == np.float32
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)
    as_paddle = image_transform(64, is_train=True, seed=123)(images[0])
    assert isinstance(as_paddle, paddle.Tensor) and list(as_paddle.shape) == [3, 64, 64]
    np.testing.assert_array_equal(as_paddle.numpy(), outs_a[0])


@pytest.mark.parametrize("scale,ratio", [((0.9, 1.0), (3 / 4, 4 / 3)), ((0.08, 0.5), (0.5, 2.0))])
def test_random_crop_within_bounds(scale, ratio):
    crop = RandomResizedCrop(32, scale=scale, ratio=ratio, seed=0)
    height, width = 300, 400
    area = height * width
    for _ in range(500):
        top, left, h, w = crop.get_params(height, width)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # w = round(x), h = round(y) with x * y = T (the sampled area, within scale * area) and
        # x / y within ratio; rounding moves each side by at most 0.5.
        assert (w - 0.5) * (h - 0.5) <= scale[1] * area and scale[0] * area <= (w + 0.5) * (h + 0.5)
        assert ratio[0] * (h - 0.5) <= w + 0.5 and w - 0.5 <= ratio[1] * (h + 0.5)


def test_random_crop_fallback_is_central():
    # A 1000x10 strip cannot hold any crop with aspect <= 4/3 and area >= 90%: central 13x10 crop.
    crop = RandomResizedCrop(8, scale=(0.9, 1.0), seed=0)
    assert crop.get_params(height=10, width=1000) == (0, (1000 - 13) // 2, 10, 13)
    assert crop.get_params(height=1000, width=10) == ((1000 - 13) // 2, 0, 13, 10)


def test_random_interpolation_is_seeded():
    img = _random_rgb(80, 80)
    outs = [image_transform(32, True, interpolation="random", seed=5, output="numpy")(img) for _ in range(2)]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_aug_cfg_scale_and_rejections():
    transform = image_transform(32, True, aug_cfg={"scale": (0.5, 0.6), "use_timm": False, "re_prob": None})
    assert transform.steps[0].scale == (0.5, 0.6)
    with pytest.raises(ValueError, match="color_jitter"):
        image_transform(32, True, aug_cfg={"color_jitter": 0.4})
    with pytest.raises(ValueError, match="bogus"):
        image_transform(32, True, aug_cfg={"bogus": 1})


def test_argument_errors():
    with pytest.raises(ValueError, match="nearest"):
        image_transform(32, False, interpolation="nearest")
    with pytest.raises(ValueError, match="crop"):
        image_transform(32, False, resize_mode="crop")
    with pytest.raises(ValueError, match="torch"):
        image_transform(32, False, output="torch")
    with pytest.raises(ValueError, match="rng or seed"):
        image_transform(32, True, rng=np.random.default_rng(0), seed=0)
    with pytest.raises(TypeError, match="fromarray"):
        image_transform(32, False)(np.zeros((8, 8, 3), np.uint8))


def test_repr_lists_steps():
    text = repr(image_transform(224, is_train=False))
    assert text == (
        "ImageTransform(\n"
        "    Resize(size=224, interpolation=bicubic)\n"
        "    CenterCropOrPad(size=(224, 224), fill=0)\n"
        "    ConvertRGB()\n"
        "    ToArray()\n"
        "    Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))\n"
        "    output=paddle\n"
        ")"
    )
    assert "RandomResizedCrop(size=(224, 224), scale=(0.9, 1.0)" in repr(image_transform(224, is_train=True))


def test_preprocess_cfg_drives_transform(expected):
    cfg = PreprocessCfg(**merge_preprocess_kwargs(
        PreprocessCfg(), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
        resize_mode="squash", fill_color=None, unrelated=1,
    ))
    assert cfg.input_size == (3, 224, 224) and cfg.fill_color == 0
    out = image_transform_v2(cfg, is_train=False, output="numpy")(_open("rgb_wide.jpg"))
    np.testing.assert_array_equal(out, expected["clipa_squash_bilinear_imagenet/rgb_wide.jpg"])
    with pytest.raises(ValueError, match="RGB"):
        PreprocessCfg(mode="L")


def test_unseeded_crop_redraws_generator_after_fork(monkeypatch):
    """Forked data-loader workers must not inherit (and repeat) the parent's random stream."""
    crop = RandomResizedCrop(32)
    parent_rng = crop.rng
    assert crop.rng is parent_rng
    monkeypatch.setattr(os, "getpid", lambda: -1)
    assert crop.rng is not parent_rng
    seeded = RandomResizedCrop(32, seed=0)
    seeded_rng = seeded.rng
    monkeypatch.setattr(os, "getpid", lambda: -2)
    assert seeded.rng is seeded_rng  # an explicit seed is the user's choice; keep it


def test_extreme_aspect_ratio_is_refused_not_exhausting_memory():
    """A 1 x 60000 strip would be resized to 224 x 13.4M pixels; it is refused with a clear message."""
    from PIL import Image

    from paddlemix.data.transforms import image_transform

    strip = Image.new("RGB", (1, 60000))
    with pytest.raises(ValueError, match="aspect ratio"):
        image_transform(224, is_train=False, output="numpy")(strip)
