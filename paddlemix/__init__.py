"""paddlemix: CLIP-family models (OpenAI/OpenCLIP CLIP, EVA-CLIP, CLIPA) for PaddlePaddle.

The public API mirrors open_clip's::

    import paddlemix
    model, _, preprocess = paddlemix.create_model_and_transforms("ViT-B-32", pretrained="weights.safetensors")
    tokenizer = paddlemix.get_tokenizer("ViT-B-32")
"""
from . import _env

# Paddle's CPU speed settings (MKL's code path, thread count, memory reuse; see _env.py), made
# before the imports below use Paddle. Importing paddlemix before paddle also sets the one
# setting read when Paddle loads; importing it after still sets the others in time.
_env.configure_process()

with _env.quiet_imports():
    from .data.tokenizer import SimpleTokenizer, tokenize
    from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform
    from .errors import PaddleMIXError
    from .factory import create_model, create_model_and_transforms, get_model_preprocess_cfg, get_tokenizer
    from .models import CLIP, CLIPConfig
    from .models.inference_mode import inference_mode
    from .zoo.pretrained import list_pretrained
    from .zoo.registry import list_models

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "PaddleMIXError",
    "SimpleTokenizer",
    "create_model",
    "create_model_and_transforms",
    "get_model_preprocess_cfg",
    "get_tokenizer",
    "image_transform",
    "inference_mode",
    "list_models",
    "list_pretrained",
    "tokenize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
]
