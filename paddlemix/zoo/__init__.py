"""The model zoo: names, downloads, checkpoint formats, and loading weights into models.

The dependency points one way, zoo -> models: ``CLIP.from_pretrained`` reaches the zoo through the
loader registered below, so model code never imports the zoo.
"""
from __future__ import annotations

from typing import Optional

import paddle

from ..models.clip_model import CLIP
from .legacy import write_paddlemix_dir
from .loading import load_checkpoint
from .resolve import resolve


def load_pretrained_model(cls, pretrained_model_name_or_path, *args, dtype: Optional[str] = None, **kwargs) -> CLIP:
    """``CLIP.from_pretrained``: a name with weights (:func:`~paddlemix.zoo.resolve.resolve`), read by the
    strict loader, in eval mode."""
    if args or kwargs:
        raise TypeError(f"unsupported from_pretrained arguments: {args} {sorted(kwargs)}")
    resolved = resolve(pretrained_model_name_or_path, weights_required=True)
    config = cls.config_class.from_model_cfg(resolved.model_cfg)
    # As create_model does: the strict loader fills every parameter, so the model is built
    # without random init and each tensor is cast on its way in.
    with paddle.LazyGuard():
        model = cls(config)
    load_checkpoint(model, resolved.weights, layout=resolved.layout, dtype=dtype, progress=None)
    if dtype is not None:  # buffers outside the state dict
        model.to(dtype=dtype)
    model.eval()
    return model


def save_paddlemix_layout(model: CLIP, save_dir) -> object:
    """``save_pretrained(dir, layout="paddlemix")``: PaddleMIX's ``config.json`` schema + ``model_state.pdparams``."""
    state = {name: t.numpy() for name, t in model.state_dict().items()}
    return write_paddlemix_dir(state, model.config.to_model_cfg(), save_dir, overwrite=True)


CLIP.register_pretrained_loader(load_pretrained_model)
for _layout in ("paddlemix", "paddlemix_legacy"):
    CLIP.register_layout_writer(_layout, save_paddlemix_layout)
