"""open_clip's model factory API: ``create_model``, ``create_model_and_transforms``, ``get_tokenizer``.

``model`` may be a registered name, a path to an open_clip-schema model-config JSON,
a directory holding an HF transformers CLIP checkpoint, or a directory written by
``save_pretrained``. ``pretrained`` may be a weights file or directory in open_clip,
EVA-CLIP, HF or paddlemix layout; conversion happens on load without torch.
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
from .models.config import CLIPConfig, ConfigError
from .zoo.key_maps import hf_config_to_model_cfg
from .zoo.loading import load_checkpoint
from .zoo.legacy import is_legacy_config
from .zoo.pretrained import model_config, resolve_factory_args
from .zoo.registry import get_model_config, load_config_file, read_json

logger = logging.getLogger(__name__)

__all__ = ["create_model", "create_model_and_transforms", "get_tokenizer", "get_model_preprocess_cfg", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "bf16", "amp", "amp_bf16", "amp_bfloat16", "pure_fp16", "pure_bf16")
_CAST = {"fp16": "float16", "pure_fp16": "float16", "bf16": "bfloat16", "pure_bf16": "bfloat16"}


def _resolve_model(model_name: Union[str, Path]) -> Tuple[Dict[str, Any], Optional[Path]]:
    """-> (open_clip-schema config, weights to load when ``pretrained`` is not given).

    The config is validated here, before anything is built, so its errors name the file.
    """
    path = Path(model_name)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        try:
            cfg, weights = _model_dir_config(path, cfg_file)
        except ConfigError as err:
            raise ConfigError(str(err) if str(cfg_file) in str(err) else f"model config {cfg_file}: {err}") from None
        CLIPConfig.check_model_cfg(cfg, source=cfg_file)
        return cfg, weights
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        return load_config_file(path), None
    return get_model_config(str(model_name)), None


def _model_dir_config(path: Path, cfg_file: Path) -> Tuple[Dict[str, Any], Optional[Path]]:
    raw = read_json(cfg_file)
    if not isinstance(raw, dict):
        raise ConfigError(f"model config {cfg_file} must be a JSON object, got {type(raw).__name__}")
    if is_legacy_config(raw):  # PaddleMIX's own config.json also says model_type 'clip'
        return model_config(path), path
    if raw.get("model_type") == "clip":
        return hf_config_to_model_cfg(raw), path
    if raw.get("model_type") == CLIPConfig.model_type:
        # Built from the config, then loaded by the same safe loader as any checkpoint,
        # so a third-party directory never reaches a full pickle load.
        return CLIPConfig.from_pretrained(str(path)).to_model_cfg(), path
    if "vision_cfg" in raw and "text_cfg" in raw:
        return raw, None
    raise ValueError(
        f"{cfg_file} is neither an HF CLIP config (model_type 'clip'), a paddlemix config, "
        f"nor an open_clip model config (got model_type {raw.get('model_type')!r})"
    )


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
) -> CLIP:
    """Build a CLIP-family model and load its weights.

    ``model_class`` selects a CLIP subclass with another ``forward`` contract (the OpenAI
    API's logits-returning model in :mod:`paddlemix.clip`); the weights are the same.

    ``precision`` 'fp16' / 'bf16' cast the weights (norms still compute in fp32);
    'amp' keeps fp32 weights for use under ``paddle.amp.auto_cast``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    # Zoo weights ((arch, tag), a zoo name, a PaddleMIX directory) become a local model directory.
    model_name, pretrained = resolve_factory_args(model_name, pretrained)
    cfg, default_weights = _resolve_model(model_name)
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
    weights = pretrained if pretrained is not None else default_weights
    if weights is None:
        model = model_class(config)
    else:
        # Weights will overwrite every parameter (the loader is strict), so skip the random
        # init: building lazily makes loading a ViT-B-16 ~7x faster.
        with paddle.LazyGuard():
            model = model_class(config)
        load_checkpoint(model, weights, dtype=_CAST.get(precision), progress=None)
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
    if isinstance(model_name, CLIP):
        text_cfg = model_name.config.text_cfg
    elif model_name is None:
        text_cfg = {}
    else:
        text_cfg = model_config(model_name).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        model_dir = model_name if isinstance(model_name, (str, Path)) and Path(model_name).is_dir() else None
        return BertTokenizer.from_text_cfg(text_cfg, context_length, vocab_file=vocab_file, model_dir=model_dir)
    return SimpleTokenizer(context_length=context_length or text_cfg.get("context_length", 77))
