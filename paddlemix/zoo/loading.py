"""Copy a checkpoint's tensors into a built model, strictly.

Every parameter of the model must be provided exactly once with the right shape,
and every tensor in the checkpoint must land somewhere: a silently half-loaded
model gives plausible but wrong features, which is the worst failure mode a model
zoo can have. Checkpoints are consumed shard by shard, so host memory stays near
one shard plus the model.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple, Union

import numpy as np
import paddle


from ..errors import PaddleMIXError
from .checkpoint import iter_checkpoint_shards
from .convert import ConversionError, convert_state_dict, detect_layout, resize_pos_embed

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "load_state_dict_into", "WeightLoadError"]


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


def _all_finite(value: np.ndarray) -> bool:
    """False when a floating-point tensor holds NaN or Inf (integer tensors are always finite)."""
    if value.dtype.kind == "f":
        return bool(np.isfinite(value).all())
    if value.dtype.name == "bfloat16":  # ml_dtypes' bfloat16 is not a numpy float kind
        return bool(np.isfinite(value.astype(np.float32)).all())
    return True


def load_state_dict_into(
    model: paddle.nn.Layer,
    shards: Iterable[Dict[str, np.ndarray]],
    layout: Optional[str] = None,
    source: str = "checkpoint",
) -> None:
    """Convert and copy each shard into ``model``; raise on missing/unexpected/mis-shaped keys."""
    targets = _target_tensors(model)
    loaded: Set[str] = set()
    unexpected = []
    nonfinite: List[str] = []
    for shard in shards:
        if not shard:
            continue
        layout = layout or detect_layout(shard)
        converted = convert_state_dict(shard, layout)
        del shard
        for name, value in converted.items():
            if name not in targets:
                unexpected.append(name)
                continue
            if name in loaded:
                raise WeightLoadError(f"{source}: weight {name} is given twice")
            target = targets[name]
            value = _fit(name, np.asarray(value), target, model)
            if not _all_finite(value):
                nonfinite.append(name)
            target.set_value(paddle.to_tensor(value).astype(target.dtype))
            loaded.add(name)
        del converted
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
    logger.info("loaded %d tensors from %s (%s layout)", len(loaded), source, layout)


def load_checkpoint(model: paddle.nn.Layer, path: Union[str, Path], layout: Optional[str] = None) -> None:
    """Load a weights file, an index of shards, or a checkpoint directory into ``model``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained weights {path} do not exist; give a file or a directory of weights")
    try:
        load_state_dict_into(model, iter_checkpoint_shards(path), layout=layout, source=str(path))
    except ConversionError as e:
        raise WeightLoadError(f"{path}: {e}") from e
