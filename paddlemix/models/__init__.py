"""Layers, towers and the CLIP model."""
from .clip_model import CLIP, build_text_tower, build_vision_tower
from .config import CLIPConfig, ConfigError, TextCfg, VisionCfg

__all__ = ["CLIP", "CLIPConfig", "ConfigError", "TextCfg", "VisionCfg", "build_text_tower", "build_vision_tower"]
