"""Pretrained weights: resolve a model-zoo name or a local directory to a directory of files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

__all__ = ["resolve_model_dir", "download_pretrained"]


def resolve_model_dir(name_or_path: Union[str, Path]) -> Path:
    """A local directory holding ``config.json`` and weights."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return path
    raise FileNotFoundError(
        f"{name_or_path!r} is not a local model directory; give the directory save_pretrained wrote"
    )


def download_pretrained(arch: str, tag: str, cache_dir: Optional[str] = None) -> Path:
    raise FileNotFoundError(
        f"no pretrained weights {arch!r}/{tag!r} are registered; pass pretrained=<weights file or directory>"
    )
