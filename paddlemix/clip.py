"""The OpenAI CLIP package's call style: ``clip.load``, ``clip.available_models``, ``clip.tokenize``.

Code written for ``import clip`` (OpenAI CLIP, the Mixer-CLIP seed) runs with
``from paddlemix import clip``. As in that package, ``model(image, text)`` returns
``(logits_per_image, logits_per_text)``: cosine similarities scaled by ``logit_scale.exp()``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import paddle

from .data.tokenizer import default_tokenizer
from .data.transforms import ImageTransform, image_transform
from .factory import create_model, get_model_preprocess_cfg
from .models.clip_model import CLIP

__all__ = ["available_models", "load", "tokenize", "CLIPWithLogits"]

logger = logging.getLogger(__name__)

# OpenAI's names -> registered architectures (OpenAI trained with QuickGELU).
_OPENAI_NAMES = {
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
}
# MLP-Mixer CLIPs (models/mixer.py), spelt like OpenAI's names. No weights are published for
# them: ``load`` builds a random initialisation unless ``pretrained`` is given.
_MIXER_NAMES = {f"Mixer-{size}/{patch}": f"Mixer-{size}-{patch}" for size in "SBL" for patch in (32, 16)}


class CLIPWithLogits(CLIP):
    """CLIP whose ``forward`` is OpenAI's: ``(logits_per_image, logits_per_text)``.

    ``clip.tokenize`` pads to 77 tokens, as OpenAI's does, whatever model was loaded; a model
    trained with a shorter context (CLIP-tiny-demo: 16) takes such rows when everything past its
    context is padding, and otherwise fails naming both lengths.
    """

    def encode_text(self, text: paddle.Tensor, normalize: bool = False) -> paddle.Tensor:
        return super().encode_text(self._fit_context(text), normalize=normalize)

    def _fit_context(self, text: paddle.Tensor) -> paddle.Tensor:
        length, context = text.shape[-1], self.context_length
        if not paddle.in_dynamic_mode() or length <= context:
            return text
        if bool((text[..., context:] == self.config.text.pad_id).all()):
            return text[..., :context]
        raise ValueError(
            f"text has tokens beyond position {context}: it was tokenized to {length} tokens per row, but this "
            f"model's context length is {context}; use clip.tokenize(texts, context_length={context}, "
            "truncate=True) to cut longer texts"
        )

    def forward(self, image: paddle.Tensor, text: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        return self.get_logits(image, text)


def available_models() -> List[str]:
    return list(_OPENAI_NAMES) + list(_MIXER_NAMES)


def load(
    name: Union[str, Path],
    device: Optional[str] = None,
    jit: bool = False,
    download_root: Optional[str] = None,
    pretrained: Optional[Union[str, Path]] = None,
) -> Tuple[CLIPWithLogits, ImageTransform]:
    """``(model, preprocess)`` like ``clip.load``.

    ``name`` is an OpenAI model name, any name ``paddlemix.list_models()`` knows, a
    model-config JSON or a model directory; ``pretrained`` a weights file or directory.
    ``device`` is accepted for call compatibility (Paddle places tensors by its current
    device); ``jit`` is not supported. ``download_root`` is where the model zoo caches
    downloaded weights.
    """
    if jit:
        raise ValueError("jit=True loads TorchScript archives, which do not exist for Paddle; use jit=False")
    if device is not None:
        paddle.set_device(device)
    arch = _OPENAI_NAMES.get(str(name)) or _MIXER_NAMES.get(str(name), name)
    if pretrained is None and str(name) in _OPENAI_NAMES:
        pretrained = "openai"  # the zoo's (architecture, tag) for OpenAI's release
    elif pretrained is None and str(name) in _MIXER_NAMES:
        logger.warning("no pretrained weights exist for %s: returning a randomly initialised model "
                       "(pass pretrained=path to load trained weights)", name)
    model = create_model(arch, pretrained, model_class=CLIPWithLogits, cache_dir=download_root)
    pp = get_model_preprocess_cfg(model)
    preprocess = image_transform(
        pp["size"], is_train=False, mean=pp["mean"], std=pp["std"], interpolation=pp["interpolation"],
        resize_mode=pp["resize_mode"],
    )
    return model, preprocess


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = False) -> paddle.Tensor:
    """Token ids ``[N, context_length]``; like OpenAI's, raises on over-long text unless ``truncate``."""
    tokenizer = default_tokenizer()
    if not truncate:
        for text in [texts] if isinstance(texts, str) else texts:
            n = len(tokenizer.encode(text)) + 2
            if n > context_length:
                raise RuntimeError(
                    f"input {text[:40]!r}... is {n} tokens, longer than context length {context_length}; "
                    "pass truncate=True to cut it (the last token is then EOT)"
                )
    return tokenizer(texts, context_length=context_length)
