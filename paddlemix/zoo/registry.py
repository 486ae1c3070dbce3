"""Registry of model architectures: every JSON file in ``paddlemix/model_configs/`` is one name.

The JSON files are open_clip-schema model configs; ``list_models()`` is just their
names, so adding an architecture is adding a file.
"""
from __future__ import annotations

import copy
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_DIR", "list_models", "get_model_config", "load_config_file", "UnknownModelError"]

# Package data (it ships in the wheel), so the registry works from any install and working directory.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"


class UnknownModelError(KeyError):
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


def load_config_file(path) -> Dict[str, Any]:
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ValueError(f"model config {path} must be a JSON object with 'embed_dim', 'vision_cfg' and 'text_cfg'")
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
