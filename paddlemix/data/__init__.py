"""Text and image pre-processing shared by every model family (CLIP tokenizer, image transforms)."""
from paddlemix.data.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer, default_tokenizer, tokenize
from paddlemix.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    AugmentationCfg,
    PreprocessCfg,
    image_transform,
    image_transform_v2,
    merge_preprocess_dict,
    merge_preprocess_kwargs,
)

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
    "AugmentationCfg",
    "PreprocessCfg",
    "SimpleTokenizer",
    "default_tokenizer",
    "image_transform",
    "image_transform_v2",
    "merge_preprocess_dict",
    "merge_preprocess_kwargs",
    "tokenize",
]
