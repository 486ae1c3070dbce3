"""open_clip's model factory API: ``create_model``, ``create_model_and_transforms``, ``get_tokenizer``.

``model_name`` is resolved by :func:`paddlemix.zoo.resolve.resolve` (its docstring lists the rules):
a registered architecture (with ``pretrained=TAG`` for zoo weights), a zoo name, a model directory
(``save_pretrained`` output, HF CLIP, PaddleMIX, open_clip), a model-config JSON, or an explicit
``local-dir:`` / ``hf-hub:`` / ``paddlemix:`` name. ``pretrained`` may also be a weights file or
directory in open_clip, EVA-CLIP, HF or paddlemix layout; conversion happens on load without torch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Type, Union

from .data.bert_tokenizer import BertTokenizer
import paddle

from .data.tokenizer import SimpleTokenizer
from .data.transforms import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    ImageTransform,
    image_transform,
)
from .models.clip_model import CLIP
from .models.config import CLIPConfig
from .zoo.loading import load_checkpoint
from .zoo.resolve import resolve

logger = logging.getLogger(__name__)

__all__ = ["create_model", "create_model_and_transforms", "get_tokenizer", "get_model_preprocess_cfg", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16", "amp_bfloat16", "pure_fp16", "pure_bf16")
_CAST = {"fp16": "float16", "pure_fp16": "float16", "bf16": "bfloat16", "pure_bf16": "bfloat16"}


def create_model(
    model_name: Union[str, Path],
    pretrained: Optional[Union[str, Path]] = None,
    *,
    precision: str = "fp32",
    force_image_size: Optional[Union[int, Sequence[int]]] = None,
    force_quick_gelu: bool = False,
    force_patch_dropout: Optional[float] = None,
    force_context_length: Optional[int] = None,
    output_dict: Optional[bool] = None,
    model_class: Type[CLIP] = CLIP,
    cache_dir: Optional[Union[str, Path]] = None,
) -> CLIP:
    """Build a CLIP-family model and load its weights.

    ``model_class`` selects a CLIP subclass with another ``forward`` contract (the OpenAI
    API's logits-returning model in :mod:`paddlemix.clip`); the weights are the same.

    ``precision`` 'fp16' / 'bf16' cast the weights (norms still compute in fp32);
    'amp' keeps fp32 weights for use under ``paddle.amp.auto_cast``. ``cache_dir`` is where zoo
    weights are downloaded and converted (default ``$PADDLEMIX_HOME``, else ``~/.cache/paddlemix``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    resolved = resolve(model_name, pretrained, cache_dir=cache_dir)
    cfg = resolved.model_cfg
    if force_quick_gelu:
        cfg["quick_gelu"] = True
        for tower in ("vision_cfg", "text_cfg"):  # a tower's own setting would otherwise win
            if cfg.get(tower, {}).get("quick_gelu") is not None:
                cfg[tower]["quick_gelu"] = True
    if force_patch_dropout is not None:
        cfg["vision_cfg"]["patch_dropout"] = force_patch_dropout
    if force_image_size is not None:
        cfg["vision_cfg"]["image_size"] = force_image_size
    if force_context_length is not None:
        cfg["text_cfg"]["context_length"] = force_context_length
    config = CLIPConfig.from_model_cfg(cfg)
    weights = resolved.weights
    if weights is None:
        model = model_class(config)
    else:
        # Weights will overwrite every parameter (the loader is strict), so skip the random
        # init: building lazily makes loading a ViT-B-16 ~7x faster.
        with paddle.LazyGuard():
            model = model_class(config)
        load_checkpoint(model, weights, layout=resolved.layout, dtype=_CAST.get(precision), progress=None)
    # Where the weights came from (None: random initialisation), for tools that must tell.
    model.weights_source = None if weights is None else str(weights)
    if precision in _CAST:
        model.to(dtype=_CAST[precision])
    if output_dict is not None:
        model.output_dict = output_dict
    model.eval()
    return model


def get_model_preprocess_cfg(model: CLIP) -> Dict[str, Any]:
    """Image size, mean/std, interpolation and resize mode the model expects."""
    cfg = {
        "size": tuple(model.image_size),
        "mean": OPENAI_DATASET_MEAN,
        "std": OPENAI_DATASET_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    cfg.update(model.config.preprocess_cfg or {})
    return cfg


def create_model_and_transforms(
    model_name: Union[str, Path],
    pretrained: Optional[Union[str, Path]] = None,
    *,
    precision: str = "fp32",
    force_image_size: Optional[Union[int, Sequence[int]]] = None,
    force_quick_gelu: bool = False,
    force_patch_dropout: Optional[float] = None,
    force_context_length: Optional[int] = None,
    image_mean: Optional[Sequence[float]] = None,
    image_std: Optional[Sequence[float]] = None,
    image_interpolation: Optional[str] = None,
    image_resize_mode: Optional[str] = None,
    interpolation: Optional[str] = None,
    square_resize_only: bool = False,
    aug_cfg: Optional[Dict[str, Any]] = None,
    output_dict: Optional[bool] = None,
    cache_dir: Optional[Union[str, Path]] = None,
) -> Tuple[CLIP, ImageTransform, ImageTransform]:
    """``(model, preprocess_train, preprocess_val)``, as open_clip returns them.

    ``interpolation`` / ``square_resize_only`` are the CLIPA code's spellings of
    ``image_interpolation`` / ``image_resize_mode='squash'``.
    """
    model = create_model(
        model_name,
        pretrained,
        precision=precision,
        force_image_size=force_image_size,
        force_quick_gelu=force_quick_gelu,
        force_patch_dropout=force_patch_dropout,
        force_context_length=force_context_length,
        output_dict=output_dict,
        cache_dir=cache_dir,
    )
    pp = get_model_preprocess_cfg(model)
    overrides = {
        "mean": image_mean,
        "std": image_std,
        "interpolation": image_interpolation or interpolation,
        "resize_mode": "squash" if square_resize_only else image_resize_mode,
    }
    pp.update({k: v for k, v in overrides.items() if v is not None})
    common = dict(mean=pp["mean"], std=pp["std"], fill_color=pp["fill_color"])
    preprocess_train = image_transform(
        pp["size"], is_train=True, interpolation=pp["interpolation"], aug_cfg=aug_cfg, **common
    )
    preprocess_val = image_transform(
        pp["size"], is_train=False, interpolation=pp["interpolation"], resize_mode=pp["resize_mode"], **common
    )
    return model, preprocess_train, preprocess_val


def get_tokenizer(
    model_name: Union[str, Path, CLIP, None] = None,
    context_length: Optional[int] = None,
    vocab_file: Optional[Union[str, Path]] = None,
) -> Union[SimpleTokenizer, BertTokenizer]:
    """The tokenizer of a model, bound to the model's context length.

    OpenAI BPE for CLIP / EVA-CLIP; BERT WordPiece for configs naming ``hf_tokenizer_name``
    (CLIPA). The BERT vocabulary is not bundled: it is read from ``vocab_file``, else from the
    model directory's ``vocab.txt``, else from ``$PADDLEMIX_HOME/vocab/<name>/vocab.txt``.
    """
    model_dir = None
    if isinstance(model_name, CLIP):
        text_cfg = model_name.config.text_cfg
    elif model_name is None:
        text_cfg = {}
    else:
        resolved = resolve(model_name, download=False)
        text_cfg, model_dir = resolved.model_cfg.get("text_cfg", {}), resolved.model_dir
    if text_cfg.get("hf_tokenizer_name"):
        return BertTokenizer.from_text_cfg(text_cfg, context_length, vocab_file=vocab_file, model_dir=model_dir)
    return SimpleTokenizer(context_length=context_length or text_cfg.get("context_length", 77))
