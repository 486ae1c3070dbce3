"""Registry of model architectures, and the one place that tells config schemas apart.

Every JSON file in ``paddlemix/model_configs/`` is one name: the files are open_clip-schema model
configs, and ``list_models()`` is just their names, so adding an architecture is adding a file.
:func:`config_kind` recognises the other schemas a model directory's ``config.json`` may be in.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import PaddleMIXError
from ..models.config import CLIPConfig, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_DIR",
    "CONFIG_KINDS",
    "LEGACY_MODEL_TYPES",
    "UnknownModelError",
    "config_kind",
    "get_model_config",
    "list_models",
    "load_config_file",
    "read_json",
]

# Package data (it ships in the wheel), so the registry works from any install and working directory.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"


class UnknownModelError(PaddleMIXError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@lru_cache(maxsize=1)
def _configs() -> Dict[str, Dict[str, Any]]:
    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(
            f"model config directory {CONFIG_DIR} is missing: this paddlemix install is incomplete; "
            "reinstall it (pip install paddlemix, or pip install . from a checkout)"
        )
    return {p.stem: load_config_file(p) for p in sorted(CONFIG_DIR.glob("*.json"))}


def read_json(path, what: str = "model config") -> Any:
    """A JSON file's content; unreadable JSON is a :class:`ConfigError` naming the file.

    Python's parser recurses once per nesting level, so a pathologically nested file raises
    RecursionError: reported here as what it is, not as a crash inside the loader.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(
            f"{what} {path} nests its JSON too deeply to parse (more levels than Python's recursion limit "
            f"{sys.getrecursionlimit()}); a model config is an object whose 'vision_cfg' and 'text_cfg' objects "
            "hold plain values"
        ) from None


# ``model_type`` of PaddleMIX's own configs: its ``CLIPConfig`` says 'clip', the string HF transformers'
# CLIP configs also carry, and its ``EVACLIPConfig`` 'evaclip'.
LEGACY_MODEL_TYPES = ("clip", "evaclip")
CONFIG_KINDS = ("open_clip_config", "paddlemix_legacy", "hf", "paddlemix", "open_clip")


def config_kind(raw: Any) -> Optional[str]:
    """The schema a model config dict is in, from explicit markers; None when none matches.

    Checked in this order (the first match wins):

    * ``open_clip_config``: a ``model_cfg`` object (``open_clip_config.json``, which open_clip's
      HF-hub repos carry: the architecture under ``model_cfg``, the transforms under ``preprocess_cfg``).
    * ``paddlemix_legacy``: ``model_type`` 'clip' or 'evaclip' *and* a ``vision_cfg`` object.
      PaddleMIX's ``config.json`` keeps its towers under ``vision_cfg`` / ``text_cfg`` (PaddleNLP
      also copies them to ``vision_config`` / ``text_config``); HF never writes ``vision_cfg``.
      This is what tells the two ``model_type: "clip"`` schemas apart.
    * ``hf``: ``model_type`` 'clip' with a ``vision_config`` object and no ``vision_cfg``
      (HF transformers' ``CLIPConfig``: ``hidden_size``, ``num_hidden_layers``, ...).
    * ``paddlemix``: ``model_type`` 'paddlemix_clip' (this project's ``save_pretrained``).
    * ``open_clip``: ``vision_cfg`` and ``text_cfg`` without any of the above (open_clip's and
      EVA-CLIP's model-config JSONs, ``paddlemix/model_configs/*.json``).
    """
    if not isinstance(raw, dict):
        return None
    model_type = raw.get("model_type")
    if isinstance(raw.get("model_cfg"), dict):
        return "open_clip_config"
    if model_type in LEGACY_MODEL_TYPES and isinstance(raw.get("vision_cfg"), dict):
        return "paddlemix_legacy"
    if model_type == "clip" and isinstance(raw.get("vision_config"), dict):
        return "hf"
    if model_type == CLIPConfig.model_type:
        return "paddlemix"
    if model_type is None and "vision_cfg" in raw and "text_cfg" in raw:
        return "open_clip"
    return None


def load_config_file(path) -> Dict[str, Any]:
    """An open_clip-schema model config file, validated (keys, types, ranges) before anything is built."""
    path = Path(path)
    cfg = read_json(path)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ConfigError(f"model config {path} must be a JSON object with 'embed_dim', 'vision_cfg' and 'text_cfg'")
    CLIPConfig.check_model_cfg(cfg, source=path)
    return cfg


def list_models() -> List[str]:
    """Names of the registered architectures, sorted."""
    return sorted(_configs(), key=lambda s: s.lower())


def _normalize(name: str) -> str:
    """PaddleMIX spellings: zoo names ``paddlemix/EVA/EVA02-CLIP-L-14`` name their
    architecture last, and ``ViT-L/14`` is open_clip's ``ViT-L-14``."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "paddlemix":
        name = parts[2]
    return name.replace("/", "-")


def get_model_config(name: str) -> Dict[str, Any]:
    """A copy of a registered config; raises :class:`UnknownModelError` with close matches."""
    configs = _configs()
    key = name if name in configs else _normalize(name)
    if key not in configs:
        import difflib

        close = difflib.get_close_matches(key, list(configs), n=5)
        hint = f" Did you mean {close}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} paddlemix.list_models() lists all names; "
            "a path to a model-config JSON or an HF CLIP directory also works."
        )
    return copy.deepcopy(configs[key])
