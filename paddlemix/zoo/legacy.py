"""PaddleMIX's own model directories: its ``config.json`` schema, translated to open_clip's.

PaddleMIX hosts its CLIP-family weights as ``<model>/config.json`` + ``model_state.pdparams``
(and per-tower ``model_state_vision.pdparams`` / ``model_state_text.pdparams``). Its configs
come from two classes: ``CLIPConfig`` (``model_type`` 'clip', the same string HF transformers
uses) and ``EVACLIPConfig`` ('evaclip'); both carry the towers under ``vision_cfg`` /
``text_cfg`` with PaddleMIX's key names. The weights themselves are handled by the
``paddlemix_legacy`` layout in :mod:`paddlemix.zoo.convert`.
"""
from __future__ import annotations

from typing import Any, Dict

from .convert import ConversionError

__all__ = ["LEGACY_MODEL_TYPES", "is_legacy_config", "legacy_config_to_model_cfg"]

LEGACY_MODEL_TYPES = ("clip", "evaclip")

# PaddleMIX switches that only choose kernels or training behaviour; they do not change the weights.
_RUNTIME_ONLY = {
    "xattn", "flash_attn", "fusedlinear", "fusedLN", "enable_recompute", "batchsize", "output_tokens",
    "token_feats", "fuse_qv", "patch_dropout", "drop_rate", "attn_drop_rate", "drop_path_rate", "init_scale",
    "qk_scale", "in_chans", "model_type", "return_dict", "embed_dim", "output_dim", "attn_mask",
}


def is_legacy_config(raw: Dict[str, Any]) -> bool:
    """True for a PaddleMIX config.json (HF's CLIP configs have ``vision_config`` but no ``vision_cfg``)."""
    return raw.get("model_type") in LEGACY_MODEL_TYPES and isinstance(raw.get("vision_cfg"), dict)


def _take(cfg: Dict[str, Any], mapping: Dict[str, str]) -> Dict[str, Any]:
    return {dst: cfg[src] for src, dst in mapping.items() if src in cfg and cfg[src] is not None}


def _reject(cfg: Dict[str, Any], what: str, known: set) -> None:
    unknown = sorted(set(cfg) - known - _RUNTIME_ONLY)
    if unknown:
        raise ConversionError(
            f"PaddleMIX {what} has keys this translation does not know: {unknown}; they may change the "
            "architecture, so convert with an explicit open_clip-schema model config instead"
        )


_CLIP_VISION = {
    "image_size": "image_size", "patch_size": "patch_size", "width": "width", "layers": "layers",
    "head_width": "head_width", "mlp_ratio": "mlp_ratio", "ls_init_value": "ls_init_value",
    "attentional_pool": "attentional_pool", "n_queries": "attn_pooler_queries",
    "attn_pooler_heads": "attn_pooler_heads",
}
_EVA_VISION = {
    "image_size": "image_size", "patch_size": "patch_size", "width": "width", "layers": "layers",
    "head_width": "head_width", "mlp_ratio": "mlp_ratio", "qkv_bias": "qkv_bias", "init_values": "ls_init_value",
    "rope": "rope", "pt_hw_seq_len": "pt_hw_seq_len", "intp_freq": "intp_freq", "naiveswiglu": "naiveswiglu",
    "subln": "subln", "postnorm": "postnorm",
}
_EVA_UNSUPPORTED = ("use_rel_pos_bias", "use_shared_rel_pos_bias", "attentional_pool")
_TEXT = {
    "context_length": "context_length", "vocab_size": "vocab_size", "width": "width", "heads": "heads",
    "layers": "layers", "ls_init_value": "ls_init_value", "mlp_ratio": "mlp_ratio", "pad_id": "pad_id",
}


def _vision_cfg(vc: Dict[str, Any], eva: bool) -> Dict[str, Any]:
    if eva:
        for key in _EVA_UNSUPPORTED:
            if vc.get(key):
                raise ConversionError(f"PaddleMIX EVA vision config sets {key}=True, which paddlemix does not implement")
        if vc.get("subln") and vc.get("inner_attn_ln") is False:
            raise ConversionError("PaddleMIX EVA vision config has subln without inner_attn_ln; not implemented")
        if vc.get("use_abs_pos_emb") is False:
            raise ConversionError("PaddleMIX EVA vision config has no absolute position embedding; not implemented")
        _reject(vc, "EVA vision config",
                set(_EVA_VISION) | set(_EVA_UNSUPPORTED) | {"inner_attn_ln", "use_abs_pos_emb", "use_mean_pooling"})
        out = _take(vc, _EVA_VISION)
        # The marker that selects the EVA tower; EVA-CLIP's configs carry the timm name here.
        out["eva_model_name"] = "eva-clip"
        out.setdefault("qkv_bias", False)  # PaddleMIX's EVA default, unlike the CLIP tower's
        mean_pool = vc.get("use_mean_pooling", True)  # PaddleMIX's default, unlike EVA-CLIP's
        if vc.get("subln"):
            # PaddleMIX builds the attention sub-LN and the plain MLP's with nn.LayerNorm's default eps;
            # only SwiGLU receives the tower's 1e-6 norm.
            out["attn_norm_eps"] = 1e-5
            out["mlp_norm_eps"] = 1e-6 if vc.get("naiveswiglu") else 1e-5
    else:
        _reject(vc, "vision config", set(_CLIP_VISION) | {"global_average_pool"})
        out = _take(vc, _CLIP_VISION)
        mean_pool = bool(vc.get("global_average_pool"))
    if mean_pool:
        # PaddleMIX averages every token, the class token included, and norms the pooled vector.
        out.update(pool_type="avg_all", final_ln_after_pool=True)
    # PaddleMIX reads quick_gelu in its text tower only; its vision towers are built with nn.GELU.
    out["quick_gelu"] = False
    return out


def _text_cfg(tc: Dict[str, Any]) -> Dict[str, Any]:
    if tc.get("embed_cls"):
        raise ConversionError("PaddleMIX text config has embed_cls=True (CoCa); not a two-tower CLIP model")
    _reject(tc, "text config", set(_TEXT) | {"embed_cls", "quick_gelu"})
    out = _take(tc, _TEXT)
    out["quick_gelu"] = bool(tc.get("quick_gelu", False))
    if tc.get("attn_mask") is False:
        out["no_causal_mask"] = True
    return out


def legacy_config_to_model_cfg(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A PaddleMIX ``config.json`` dict as an open_clip-schema model config.

    Unknown tower keys are an error rather than ignored: a switch this translation does not
    know could change the architecture, and the strict weight loader would then report a
    confusing mismatch instead of the real cause.
    """
    if not is_legacy_config(raw):
        raise ConversionError(
            f"not a PaddleMIX config (model_type {raw.get('model_type')!r}, keys {sorted(raw)[:12]}); "
            f"expected model_type in {LEGACY_MODEL_TYPES} with a 'vision_cfg' object"
        )
    vc, tc = dict(raw["vision_cfg"]), dict(raw.get("text_cfg") or {})
    embed_dim = raw.get("embed_dim") or vc.get("embed_dim") or tc.get("embed_dim")
    if not isinstance(embed_dim, int):
        raise ConversionError("PaddleMIX config has no integer embed_dim (looked at the top level, vision_cfg, text_cfg)")
    return {
        "embed_dim": embed_dim,
        "quick_gelu": False,  # set per tower above
        "vision_cfg": _vision_cfg(vc, eva=raw["model_type"] == "evaclip"),
        "text_cfg": _text_cfg(tc),
    }
