"""Write a checkpoint as a paddlemix model directory: ``config.json``, ``model.safetensors``, ``manifest.json``.

This is what the model zoo keeps in its cache and what ``python -m paddlemix.convert`` writes.
The directory is built under a temporary name and renamed into place, and ``manifest.json``
(sizes and sha256 of every file, plus where the weights came from) is written last, so a
directory with a valid manifest is always complete. Conversion never builds the full model:
names and shapes are checked against a model constructed under ``paddle.LazyGuard``, which
allocates nothing, so converting a multi-billion-parameter checkpoint costs one pass over it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import paddle

from ..models.clip_model import CLIP
from ..models.config import CLIPConfig
from .checkpoint import iter_checkpoint_shards
from .download import file_sha256
from .formats import LazyArray, save_safetensors, save_safetensors_sharded, to_bfloat16_bits
from .key_maps import ConversionError, convert_shards
from .loading import WeightLoadError, _mismatch_summary

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "DTYPES",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "features",
    "manifest_problem",
    "parse_size",
    "read_manifest",
    "write_model_dir",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "paddlemix-model-dir"
DTYPES = ("fp16", "bf16", "fp32", "keep")
_NUMPY_DTYPES = {"fp16": np.float16, "fp32": np.float32}
_DTYPE_NAMES = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", np.dtype(np.float64): "fp64"}


def _expected_shapes(model_cfg: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Parameter names and shapes of the model ``model_cfg`` builds, without allocating it."""
    with paddle.LazyGuard():
        model = CLIP(CLIPConfig.from_model_cfg(model_cfg))
    return {name: tuple(int(d) for d in t.shape) for name, t in model.state_dict().items()}


def _stored_dtype(value_dtype: np.dtype, dtype: str) -> np.dtype:
    """``keep`` stores what the checkpoint holds (bfloat16 arrives widened to float32, exactly);
    bf16 is stored as its uint16 bits."""
    if value_dtype.kind != "f" or dtype == "keep":
        return value_dtype
    return np.dtype(np.uint16) if dtype == "bf16" else np.dtype(_NUMPY_DTYPES[dtype])


def _finisher(name: str, shape: Tuple[int, ...], dtype: str, source: str) -> Callable[[np.ndarray], np.ndarray]:
    """Checks a converted tensor's shape (known only once it is computed) and casts it for storage."""

    def finish(value: np.ndarray) -> np.ndarray:
        if value.shape != shape:
            if value.size != 1 or math.prod(shape) != 1:  # logit_scale: [] vs [1]
                raise WeightLoadError(f"{source} does not match the model config (shape mismatch {name}: checkpoint "
                                      f"{list(value.shape)}, model {list(shape)})")
            value = value.reshape(shape)
        if value.dtype.kind != "f" or dtype == "keep":
            return value
        if dtype == "bf16":
            return to_bfloat16_bits(value.astype(np.float32, copy=False))
        return value.astype(_NUMPY_DTYPES[dtype], copy=False)

    return finish


def convert_weights(
    shards: Iterable[Dict[str, np.ndarray]],
    model_cfg: Dict[str, Any],
    dtype: str,
    layout: Optional[str] = None,
    source: str = "checkpoint",
) -> Tuple[Dict[str, LazyArray], List[str], str]:
    """Plan the conversion of every shard to paddlemix names and ``dtype``; check it against the architecture.

    Returns (tensors, names stored as bfloat16 bits, layout). The tensors are
    :class:`~paddlemix.zoo.formats.lazy.LazyArray` of the stored shape and dtype: nothing is
    read until they are written, one at a time, so converting a multi-GB checkpoint holds one
    tensor, not a second copy of the model. Missing and unexpected names, and shapes known
    from the file, are a :class:`WeightLoadError` naming the keys, as in
    :func:`paddlemix.zoo.loading.load_checkpoint`; a shape that only conversion reveals is
    checked when the tensor is computed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    expected = _expected_shapes(model_cfg)
    out: Dict[str, LazyArray] = {}
    bf16_names: List[str] = []
    unexpected, wrong_shape = [], []
    try:
        converted_shards = list(convert_shards(shards, layout))
    except ConversionError as e:
        raise WeightLoadError(f"{source}: {e}") from e
    for layout, converted in converted_shards:  # plans only: nothing is read yet
        for name, value in converted.items():
            if name not in expected:
                unexpected.append(name)
                continue
            if name in out:
                raise WeightLoadError(f"{source}: weight {name} is given twice")
            shape = getattr(value, "shape", None)
            if shape is not None and tuple(shape) != expected[name] and not (
                math.prod(shape) == 1 and math.prod(expected[name]) == 1
            ):
                wrong_shape.append(f"{name}: checkpoint {list(shape)}, model {list(expected[name])}")
                continue
            stored = _stored_dtype(value.dtype, dtype)
            if dtype == "bf16" and value.dtype.kind == "f":
                bf16_names.append(name)
            out[name] = LazyArray(_finisher(name, expected[name], dtype, source), value, shape=expected[name],
                                  dtype=stored)
    missing = sorted(set(expected) - set(out))
    if missing or unexpected or wrong_shape:
        problems = _mismatch_summary(
            ("missing weights", missing), ("unexpected weights", sorted(unexpected)), ("shape mismatches", wrong_shape)
        )
        raise WeightLoadError(
            f"{source} does not match the model config ({problems}). "
            "Check that --model names the architecture these weights were trained with."
        )
    if layout is None:
        raise WeightLoadError(f"{source} holds no tensors")
    return out, bf16_names, layout


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"5GB"``, ``"500MiB"`` or ``"1000000"``."""
    match = _SIZE.fullmatch(str(text))
    if match is None:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def _file_record(path: Path) -> Dict[str, Any]:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def read_manifest(directory: Union[str, Path]) -> Dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a paddlemix manifest (format {manifest.get('format')!r})")
    return manifest


def manifest_problem(directory: Union[str, Path], full: bool = False) -> Optional[str]:
    """None when the directory is complete and unchanged; otherwise what is wrong.

    Sizes are always checked (one ``stat`` per file, cheap enough for every load);
    ``full=True`` also re-hashes every file against its recorded sha256.
    """
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        return f"{directory / MANIFEST_NAME} is missing (conversion did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    for name, record in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != record.get("size"):
            return f"{path} is {path.stat().st_size} bytes, the manifest says {record.get('size')}"
        if full and file_sha256(path) != record.get("sha256"):
            return f"{path} does not match the sha256 in the manifest"
    return None


def write_model_dir(
    src: Union[str, Path],
    model_cfg: Dict[str, Any],
    out_dir: Union[str, Path],
    *,
    dtype: str = "fp16",
    layout: Optional[str] = None,
    source: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
    check: Optional[Callable[[Path], Mapping[str, Any]]] = None,
    max_shard_size: Optional[int] = None,
) -> Path:
    """Convert the weights at ``src`` into a complete paddlemix model directory at ``out_dir``.

    ``model_cfg`` is an open_clip-schema config; its ``preprocess_cfg`` (mean/std,
    interpolation, resize mode) is stored in ``config.json`` so the directory alone
    reproduces the model's transforms. ``max_shard_size`` (bytes) splits the weights into
    ``model-0000i-of-0000N.safetensors`` shards behind ``model.safetensors.index.json``;
    None writes one ``model.safetensors``. Tensors are converted and written one at a time.
    ``source`` is recorded in the manifest. ``check`` is
    called on the finished directory before it is moved into place; if it raises, nothing is
    left behind, and what it returns is recorded in the manifest as ``verification``.
    """
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True (--overwrite)")
    tensors, bf16_names, layout = convert_weights(iter_checkpoint_shards(src), model_cfg, dtype, layout, str(src))
    if dtype == "keep":
        stored = {_DTYPE_NAMES.get(v.dtype, str(v.dtype)) for v in tensors.values() if v.dtype.kind == "f"}
        dtype = stored.pop() if len(stored) == 1 else "mixed"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from its other users
        CLIPConfig.from_model_cfg(model_cfg).save_pretrained(str(tmp))
        metadata = {"format": "np", "dtype": dtype}
        if max_shard_size is None:
            save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata=metadata, bfloat16=bf16_names)
            weight_files = [WEIGHTS_NAME]
        else:
            weight_files = save_safetensors_sharded(tensors, tmp, max_shard_size, metadata, bfloat16=bf16_names)
        del tensors
        verification = dict(check(tmp)) if check is not None else None
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "dtype": dtype,
            "layout": layout,
            "source": dict(source or {"path": str(src)}),
            "files": {name: _file_record(tmp / name) for name in (CONFIG_NAME, *weight_files)},
        }
        if verification is not None:
            manifest["verification"] = verification
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():  # overwrite: move the old directory aside only once the new one is whole
            old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (%s, %s layout, from %s)", out_dir, dtype, layout, src)
    return out_dir


def probe_inputs(model: CLIP, batch: int = 2, seed: int = 0) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """A fixed random image batch and token batch sized for ``model``, for comparing two models."""
    rng = np.random.default_rng(seed)
    h, w = model.image_size
    image = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
    vocab, ctx = model.text.vocab_size, model.context_length
    text = rng.integers(1, vocab - 1, size=(batch + 1, ctx))
    text[:, -1] = vocab - 1  # an end token (the largest id) for argmax / eos pooling
    return paddle.to_tensor(image), paddle.to_tensor(text.astype(np.int64))


def features(model: CLIP, image: paddle.Tensor, text: paddle.Tensor) -> Dict[str, np.ndarray]:
    with paddle.no_grad():
        return {
            "image_features": model.encode_image(image).astype("float32").numpy(),
            "text_features": model.encode_text(text).astype("float32").numpy(),
        }


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """Max absolute difference and smallest cosine similarity of each feature pair."""
    out: Dict[str, float] = {}
    for key in a:
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        if x.shape != y.shape:
            raise ValueError(f"{key}: shapes differ, {x.shape} vs {y.shape}")
        cos = (x * y).sum(-1) / np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-12)
        out[f"{key}_max_abs_diff"] = float(np.abs(x - y).max())
        out[f"{key}_min_cosine"] = float(cos.min())
    return out


# Pass criteria of a verification: an fp32 copy must reproduce the source exactly (same weights,
# same kernels); a half-precision copy differs by weight rounding only, which leaves features
# nearly parallel. The torch reference runs other kernels, hence its small absolute tolerance.
FP32_MAX_ABS_DIFF = 1e-6
HALF_MIN_COSINE = 0.999
TORCH_FP32_MAX_ABS_DIFF = 1e-4


def _passes(stats: Mapping[str, float], dtype: str, fp32_tol: float) -> bool:
    if dtype == "fp32":
        return all(v <= fp32_tol for k, v in stats.items() if k.endswith("max_abs_diff"))
    return all(v >= HALF_MIN_COSINE for k, v in stats.items() if k.endswith("min_cosine"))


def torch_reference_features(
    src: Union[str, Path], model_cfg: Mapping[str, Any], image: np.ndarray, text: np.ndarray
) -> Optional[Dict[str, np.ndarray]]:
    """Features of the source checkpoint run by open_clip in torch, or None if they are not installed.

    Optional by design: torch is never a dependency. The weights still go through the safe
    loader (no pickle code runs); only the forward pass is open_clip's.
    """
    try:
        import open_clip  # noqa: F401
        import torch
    except ImportError:
        return None
    from .checkpoint import load_state_dict

    cfg = {k: v for k, v in model_cfg.items() if k not in ("preprocess_cfg",)}
    state = {k: torch.from_numpy(np.array(v)) for k, v in load_state_dict(src).items()}
    custom = bool(cfg.pop("custom_text", False)) or any(k.startswith("text.") for k in state)
    model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return {
            "image_features": model.encode_image(torch.from_numpy(image)).float().numpy(),
            "text_features": model.encode_text(torch.from_numpy(text)).float().numpy(),
        }


def source_check(
    src: Union[str, Path], model_cfg: Dict[str, Any], dtype: str, layout: Optional[str], use_torch: str = "auto"
) -> Callable[[Path], Dict[str, Any]]:
    """A ``check`` for :func:`write_model_dir`: run the source and the written copy on the same inputs.

    The source model is built in Paddle from the original checkpoint (fp32); the copy is loaded
    back with ``CLIP.from_pretrained``. With ``use_torch`` 'auto' (when importable) or 'require',
    an open_clip-layout source is also run by open_clip in torch and compared with the copy.
    """
    from .loading import load_checkpoint

    if use_torch not in ("auto", "off", "require"):
        raise ValueError(f"use_torch must be 'auto', 'off' or 'require', got {use_torch!r}")

    def check(directory: Path) -> Dict[str, Any]:
        source_model = CLIP(CLIPConfig.from_model_cfg(model_cfg))
        load_checkpoint(source_model, src, layout=layout)
        source_model.eval()
        copy = CLIP.from_pretrained(str(directory))
        image, text = probe_inputs(source_model)
        expected = features(source_model, image, text)
        del source_model
        got = features(copy, image, text)
        report: Dict[str, Any] = {"inputs": {"image": list(image.shape), "text": list(text.shape), "seed": 0}}
        report["paddle_source"] = compare(expected, got)
        ok = _passes(report["paddle_source"], dtype, FP32_MAX_ABS_DIFF)
        reference = None
        if use_torch != "off" and layout == "open_clip":
            reference = torch_reference_features(src, model_cfg, image.numpy(), text.numpy())
        if reference is None and use_torch == "require":
            raise RuntimeError("--torch require: torch and open_clip are not importable, or the source is not "
                               "an open_clip-layout checkpoint")
        if reference is not None:
            report["torch_open_clip"] = compare(reference, got)
            ok = ok and _passes(report["torch_open_clip"], dtype, TORCH_FP32_MAX_ABS_DIFF)
        else:
            report["torch_open_clip"] = "skipped (torch/open_clip not importable, or not an open_clip checkpoint)"
        if not ok:
            raise WeightLoadError(f"verification failed: the written model's features differ from the source: {report}")
        report["passed"] = True
        return report

    return check
