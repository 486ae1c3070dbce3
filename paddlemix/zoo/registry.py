"""Registry of model architectures: every JSON file in ``paddlemix/model_configs/`` is one name.

The JSON files are open_clip-schema model configs; ``list_models()`` is just their
names, so adding an architecture is adding a file.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List

from ..errors import PaddleMIXError
from ..models.config import CLIPConfig, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_DIR", "list_models", "get_model_config", "load_config_file", "read_json", "UnknownModelError"]

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
