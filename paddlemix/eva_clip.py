"""The EVA-CLIP package's call style (``from eva_clip import ...``).

EVA-CLIP models are ordinary :class:`paddlemix.models.CLIP` models with EVA tower
switches in their configs, so this module only maps EVA's entry points onto the
shared factory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

from .data.tokenizer import tokenize
from .data.transforms import ImageTransform
from .factory import create_model, create_model_and_transforms, get_tokenizer
from .models.clip_model import CLIP

__all__ = ["build_eva_model_and_transforms", "create_model", "create_model_and_transforms", "get_tokenizer", "tokenize"]


def build_eva_model_and_transforms(
    model_name: Union[str, Path],
    pretrained: Optional[Union[str, Path]] = None,
    precision: str = "fp32",
    force_image_size: Optional[int] = None,
) -> Tuple[CLIP, ImageTransform]:
    """``(model, preprocess_val)`` as EVA-CLIP's first release returned them."""
    model, _, preprocess_val = create_model_and_transforms(
        model_name, pretrained, precision=precision, force_image_size=force_image_size
    )
    return model, preprocess_val
