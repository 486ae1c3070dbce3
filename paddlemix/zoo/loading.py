"""Copy a checkpoint's tensors into a built model, strictly, one tensor at a time.

Every parameter of the model must be provided exactly once with the right shape,
and every tensor in the checkpoint must land somewhere: a silently half-loaded
model gives plausible but wrong features, which is the worst failure mode a model
zoo can have.

Loading streams: the checkpoint is memory-mapped, the layout conversion is planned
without reading anything (:func:`convert_state_dict` with ``lazy=True``), and each
tensor is read, converted, cast to the target dtype and handed to its parameter
before the next one is touched; its file pages are then released. A model built
under ``paddle.LazyGuard`` has no storage until its data arrives, so host memory
peaks near the model itself in the target dtype plus one tensor, whatever the
checkpoint's size or dtype.
"""
from __future__ import annotations

import ctypes
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import paddle
from tqdm import tqdm


from ..errors import PaddleMIXError
from ..models.transformer import TextTransformer, VisionTransformer
from .checkpoint import iter_checkpoint_shards
from .formats import LazyArray, release
from .key_maps import ConversionError, convert_shards, convert_state_dict, detect_layout, resize_pos_embed

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "load_state_dict_into", "load_tower", "WeightLoadError"]


class WeightLoadError(PaddleMIXError, ValueError):
    """Missing, unexpected or mis-shaped weights."""


def _mismatch_summary(*labelled: Tuple[str, List[str]]) -> str:
    """``label [first 20 names] ...`` for each non-empty list of names, joined by ``; ``."""
    return "; ".join(f"{label} {names[:20]}{' ...' if len(names) > 20 else ''}" for label, names in labelled if names)


def _target_tensors(model: paddle.nn.Layer) -> Dict[str, paddle.Tensor]:
    return dict(model.state_dict().items())


def _fit(name: str, value: np.ndarray, target: paddle.Tensor, model) -> np.ndarray:
    shape = list(target.shape)
    if list(value.shape) == shape:
        return value
    if name == "visual.positional_embedding" and value.ndim == 2 and value.shape[1] == shape[1]:
        grid = tuple(model.visual.grid_size)
        logger.info("resizing %s from %s to %s for grid %s", name, list(value.shape), shape, grid)
        return resize_pos_embed(value, grid)
    if value.size == target.size and value.size == 1:  # scalar stored as [1] or []
        return value.reshape(shape)
    raise WeightLoadError(f"shape mismatch for {name}: checkpoint has {list(value.shape)}, model expects {shape}")


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# Casts that keep every value: going through them first changes nothing.
_EXACT_WIDENING = {(np.dtype(np.float16), np.dtype(np.float32)), (np.dtype(np.float16), np.dtype(np.float64)),
                   (np.dtype(np.float32), np.dtype(np.float64))}


_BF16_SLICE = 1 << 16  # elements cast to bfloat16 at a time: small enough for malloc to reuse, not keep


def _numpy_dtype(dtype: paddle.dtype) -> Optional[np.dtype]:
    """The numpy dtype of a Paddle dtype; None for bfloat16, which numpy lacks."""
    if dtype == paddle.bfloat16:
        return None
    return np.dtype(str(dtype).rsplit(".", 1)[-1])


def _host_array(tensor: paddle.Tensor, dtype: np.dtype) -> np.ndarray:
    """A writable numpy view of a contiguous CPU tensor's memory (valid while ``tensor`` lives)."""
    nbytes = math.prod(tensor.shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(tensor.shape, dtype=dtype)
    return np.frombuffer((ctypes.c_char * nbytes).from_address(tensor.data_ptr()), dtype=dtype).reshape(tensor.shape)


def _assign(param: paddle.Tensor, value: np.ndarray, dtype: Optional[paddle.dtype]) -> int:
    """Give ``param`` the data ``value``, cast to the parameter's dtype and then to ``dtype``.

    The two casts are those of loading into the model and then ``model.to(dtype)``, so the
    bits are the same; the intermediate one is skipped when it cannot change a value (no
    cast, or an exact widening such as float16 -> float32). On CPU the result is written
    straight into the new parameter's memory, casting on the way (numpy rounds as Paddle
    does), so no tensor is ever held twice; bfloat16, which numpy lacks, goes through
    Paddle's cast. A parameter built under ``LazyGuard`` has no storage yet and takes the
    new tensor's; an allocated one keeps its storage when the dtype stays. Returns the bytes
    the parameter now holds.
    """
    final = param.dtype if dtype is None else dtype
    param_np, final_np = _numpy_dtype(param.dtype), _numpy_dtype(final)
    if param_np is not None and value.dtype != param_np and param_np != final_np \
            and (value.dtype, param_np) not in _EXACT_WIDENING:
        value = np.asarray(value).astype(param_np)
    on_cpu = paddle.device.get_device() == "cpu"
    if final_np is not None and on_cpu:
        tensor = paddle.empty(list(param.shape), dtype=final)
        out = _host_array(tensor, final_np)
        if isinstance(value, LazyArray):  # shape checked by the caller
            value.write(out)
        else:
            np.copyto(out, value.reshape(out.shape), casting="unsafe")
    elif final == paddle.bfloat16 and on_cpu:
        # Paddle casts (numpy has no bfloat16), a slice at a time so only a slice is held twice.
        tensor = paddle.empty(list(param.shape), dtype=final)
        out = _host_array(tensor, np.dtype(np.uint16)).reshape(-1)
        flat = np.asarray(value).reshape(-1)
        for start in range(0, flat.size, _BF16_SLICE):
            piece = flat[start:start + _BF16_SLICE]
            piece = paddle.to_tensor(piece if param_np is None else piece.astype(param_np, copy=False))
            out[start:start + _BF16_SLICE] = piece.astype(param.dtype).astype(final).numpy()  # bf16 -> uint16 bits
    else:
        value = np.asarray(value)
        tensor = paddle.to_tensor(value if param_np is None else value.astype(param_np, copy=False))
        tensor = tensor.astype(param.dtype).astype(final)
    if param._is_initialized() and tensor.dtype == param.dtype:
        param.set_value(tensor)
    else:
        param.value().get_tensor()._share_data_nocheck_with(tensor.value().get_tensor())
    return tensor.numel().item() * tensor.element_size()


_BF16_EXPONENT = np.uint16(0x7F80)  # all exponent bits set: Inf or NaN
_CHECK_SLICE = 1 << 20  # elements per slice of the NaN/Inf check


def _has_nonfinite(param: paddle.Tensor) -> bool:
    """True when a floating-point parameter holds NaN or Inf (checked after it is filled, so lazy data is read once).

    On a CPU the check reads the parameter's memory through numpy a slice at a time: twice the
    speed of Paddle's single-threaded ``isfinite``, and no mask the size of the weight (a
    quarter of a float32 model in all). bfloat16, which numpy lacks, is checked on its
    exponent bits.
    """
    if not paddle.is_floating_point(param):
        return False
    if not (param.place.is_cpu_place() and param.is_contiguous()):
        return not bool(paddle.isfinite(param).all().item())
    np_dtype = _numpy_dtype(param.dtype)
    flat = _host_array(param, np.dtype(np.uint16) if np_dtype is None else np_dtype).reshape(-1)
    for start in range(0, flat.size, _CHECK_SLICE):
        piece = flat[start:start + _CHECK_SLICE]
        if np_dtype is None:
            if np.any((piece & _BF16_EXPONENT) == _BF16_EXPONENT):
                return True
        elif not np.isfinite(piece).all():
            return True
    return False


def load_state_dict_into(
    model: paddle.nn.Layer,
    shards: Iterable[Dict[str, Any]],
    layout: Optional[str] = None,
    source: str = "checkpoint",
    dtype: Optional[Union[str, paddle.dtype]] = None,
    progress: Optional[bool] = False,
) -> None:
    """Convert and copy each shard into ``model``; raise on missing/unexpected/mis-shaped keys.

    Shard values may be arrays or :class:`~paddlemix.zoo.formats.lazy.LazyArray`; each is read
    only when its parameter is filled. ``dtype`` (e.g. ``"float16"``) is the dtype every
    parameter ends in, as after ``model.to(dtype=...)``; None keeps the model's. ``progress``
    shows a bar over the model's tensors (None: only on a terminal).
    """
    targets = _target_tensors(model)
    if dtype is not None and not isinstance(dtype, paddle.dtype):
        dtype = paddle.base.framework.convert_np_dtype_to_dtype_(dtype)
    loaded: Set[str] = set()
    unexpected = []
    start, nbytes = time.perf_counter(), 0
    # tqdm's disable=None shows the bar on a terminal only; the delay keeps quick loads quiet.
    bar = tqdm(total=len(targets), unit="tensor", desc=f"loading {Path(source).name}", leave=False, delay=2.0,
               disable=None if progress is None else not progress)
    nonfinite: List[str] = []
    with bar:
        for layout, converted in convert_shards(shards, layout):
            for name in list(converted):
                planned = value = converted.pop(name)
                if name not in targets:
                    unexpected.append(name)
                    continue
                if name in loaded:
                    raise WeightLoadError(f"{source}: weight {name} is given twice")
                target = targets[name]
                if not (isinstance(value, LazyArray) and value.shape == tuple(target.shape)):
                    value = _fit(name, np.asarray(value), target, model)
                nbytes += _assign(target, value, dtype)
                if _has_nonfinite(target):
                    nonfinite.append(name)
                release(planned)  # the file pages it was read from
                loaded.add(name)
                bar.update()
    missing = sorted(set(targets) - loaded)
    if unexpected or missing:
        problems = _mismatch_summary(("missing weights", missing), ("unexpected weights", sorted(unexpected)))
        raise WeightLoadError(
            f"{source} does not match the model ({problems}). "
            "Check that the model config is the one these weights were trained with."
        )
    if nonfinite:
        # Loaded as stored (a diverged checkpoint is still worth inspecting), but never silently:
        # NaN weights turn every feature into NaN.
        logger.warning("%s: %d weight tensors contain NaN or Inf values: %s", source, len(nonfinite),
                       _mismatch_summary(("", sorted(nonfinite))).strip())
    logger.info(
        "loaded %d tensors (%.2f GB) from %s (%s layout) in %.1f s; peak RSS %.2f GB",
        len(loaded), nbytes / 1e9, source, layout, time.perf_counter() - start, _peak_rss_bytes() / 1e9,
    )


def load_checkpoint(
    model: paddle.nn.Layer,
    path: Union[str, Path],
    layout: Optional[str] = None,
    dtype: Optional[Union[str, paddle.dtype]] = None,
    progress: Optional[bool] = False,
) -> None:
    """Load a weights file, an index of shards, or a checkpoint directory into ``model``.

    ``dtype`` casts every parameter on the way in (as ``model.to(dtype=...)`` after loading
    would, without a second copy of the model); ``progress`` as in :func:`load_state_dict_into`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained weights {path} do not exist; give a file or a directory of weights")
    try:
        load_state_dict_into(
            model, iter_checkpoint_shards(path), layout=layout, source=str(path), dtype=dtype, progress=progress
        )
    except ConversionError as e:
        raise WeightLoadError(f"{path}: {e}") from e


def load_tower(tower: paddle.nn.Layer, path: Union[str, Path], layout: Optional[str] = None) -> None:
    """Load one tower's weights, strictly, from a tower file or from a whole-model checkpoint.

    Tower files (PaddleMIX's ``model_state_vision.pdparams`` / ``model_state_text.pdparams``,
    or any layout's tower state dict) hold names without the ``visual.`` / ``text.`` prefix;
    a whole-model checkpoint contributes only this tower's weights.
    """
    if isinstance(tower, VisionTransformer):
        prefix = "visual"
    elif isinstance(tower, TextTransformer):
        prefix = "text"
    else:
        raise TypeError(f"load_tower needs a VisionTransformer or TextTransformer (model.visual / model.text), "
                        f"got {type(tower).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tower weights {path} do not exist")

    def shards() -> Iterator[Dict[str, Any]]:
        for shard in iter_checkpoint_shards(path):
            whole = any(k.startswith(("visual.", "text.")) for k in shard)
            if not whole:
                shard = {f"{prefix}.{k}": v for k, v in shard.items()}
            try:
                converted = convert_state_dict(shard, layout or detect_layout(shard), lazy=True)
            except ConversionError as e:
                raise WeightLoadError(f"{path}: {e}") from e
            yield {k: v for k, v in converted.items() if k.startswith(prefix + ".")}

    holder = paddle.nn.Layer()
    setattr(holder, prefix, tower)  # names become '<prefix>.*' and the loader finds visual.grid_size
    load_state_dict_into(holder, shards(), layout="paddlemix", source=str(path))
