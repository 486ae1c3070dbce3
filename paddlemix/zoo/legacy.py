"""PaddleMIX's own model directories: its ``config.json`` schema, translated to open_clip's.

PaddleMIX hosts its CLIP-family weights as ``<model>/config.json`` + ``model_state.pdparams``
(and per-tower ``model_state_vision.pdparams`` / ``model_state_text.pdparams``). Its configs
come from two classes: ``CLIPConfig`` (``model_type`` 'clip', the same string HF transformers
uses) and ``EVACLIPConfig`` ('evaclip'); both carry the towers under ``vision_cfg`` /
``text_cfg`` with PaddleMIX's key names. The weights themselves are handled by the
``paddlemix_legacy`` layout in :mod:`paddlemix.zoo.key_maps`.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, List, Union

import numpy as np
from paddlenlp.transformers.configuration_utils import PretrainedConfig

from .formats.lazy import bf16_bits_to_float32
from .key_maps import ConversionError
from .registry import LEGACY_MODEL_TYPES, config_kind

logger = logging.getLogger(__name__)

__all__ = [
    "LEGACY_MODEL_TYPES",
    "LEGACY_WEIGHTS_NAME",
    "legacy_config_to_model_cfg",
    "model_cfg_to_legacy_config",
    "paddlemix_differences",
    "to_paddlemix_state_dict",
    "write_paddlemix_dir",
]

# PaddleMIX switches that only choose kernels or training behaviour; they do not change the weights.
_RUNTIME_ONLY = {
    "xattn", "flash_attn", "fusedlinear", "fusedLN", "enable_recompute", "batchsize", "output_tokens",
    "token_feats", "fuse_qv", "patch_dropout", "drop_rate", "attn_drop_rate", "drop_path_rate", "init_scale",
    "qk_scale", "in_chans", "model_type", "return_dict", "embed_dim", "output_dim", "attn_mask",
}


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
    if config_kind(raw) != "paddlemix_legacy":
        raise ConversionError(
            f"not a PaddleMIX config (model_type {raw.get('model_type')!r}, keys {sorted(raw)[:12]}); "
            f"expected model_type in {LEGACY_MODEL_TYPES} with a 'vision_cfg' object"
        )
    vc, tc = dict(raw["vision_cfg"]), dict(raw.get("text_cfg") or {})
    embed_dim = raw.get("embed_dim") or vc.get("embed_dim") or tc.get("embed_dim")
    if not isinstance(embed_dim, int):
        raise ConversionError("PaddleMIX config has no integer embed_dim (looked at the top level, vision_cfg, text_cfg)")
    out = {
        "embed_dim": embed_dim,
        "quick_gelu": False,  # set per tower above
        "vision_cfg": _vision_cfg(vc, eva=raw["model_type"] == "evaclip"),
        "text_cfg": _text_cfg(tc),
    }
    if raw["model_type"] == "clip":
        out["custom_text"] = bool(raw.get("custom_text", False))  # only the key layout: kept for the way back
    return out


# ------------------------------------------------------------------------------------------------
# The way back: a paddlemix model as a directory PaddleMIX's own ``from_pretrained`` reads.

LEGACY_WEIGHTS_NAME = "model_state.pdparams"


def _tower_semantics(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What decides the numbers besides the weights, as this project computes them for ``model_cfg``."""
    from ..models.config import CLIPConfig

    cfg = CLIPConfig.from_model_cfg({k: v for k, v in model_cfg.items() if k != "preprocess_cfg"})
    vc, tc = cfg.vision, cfg.text
    vision_quick = vc.quick_gelu if vc.quick_gelu is not None else cfg.quick_gelu
    text_quick = tc.quick_gelu if tc.quick_gelu is not None else cfg.quick_gelu
    pool, ln_after = vc.pool_type, vc.final_ln_after_pool
    pooling = {"tok": "class token", "avg": "average of the patch tokens",
               "avg_all": "average of every token, class token included"}.get(pool, pool)
    if pool in ("avg", "avg_all"):  # for the class token the norm commutes with taking it
        pooling += ", normed after pooling" if ln_after else ", normed before pooling"
    tower_eps = vc.layer_norm_eps()
    out = {
        "vision activation": "QuickGELU" if vision_quick else "GELU",
        "text activation": "QuickGELU" if text_quick else "GELU",
        "image pooling": pooling,
    }
    if vc.subln:
        out["attention sub-LN eps"] = vc.attn_norm_eps if vc.attn_norm_eps is not None else tower_eps
        out["MLP sub-LN eps"] = vc.mlp_norm_eps if vc.mlp_norm_eps is not None else tower_eps
    return out


def paddlemix_differences(model_cfg: Dict[str, Any]) -> List[str]:
    """How PaddleMIX would compute differently from ``model_cfg`` with the same weights.

    PaddleMIX reads quick_gelu in its text tower only, averages every token when it mean-pools
    and builds some EVA sub-LNs with eps 1e-5; weights released by open_clip or EVA-CLIP can
    therefore give other numbers under PaddleMIX than under their original code. Empty when
    the two agree.
    """
    ours = _tower_semantics(model_cfg)
    theirs = _tower_semantics(legacy_config_to_model_cfg(model_cfg_to_legacy_config(model_cfg)))
    return [f"{key}: {ours[key]} here, {theirs.get(key)} in PaddleMIX" for key in ours if ours[key] != theirs.get(key)]


def _refuse(what: str) -> ConversionError:
    return ConversionError(f"PaddleMIX's model classes cannot express {what}; this model cannot be saved in its layout")


def model_cfg_to_legacy_config(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The ``model_type`` and tower configs of PaddleMIX's ``CLIPConfig`` / ``EVACLIPConfig`` for ``model_cfg``.

    Tower keys are PaddleMIX's, written where they differ from its defaults (plus the sizes), as
    PaddleMIX's own configs are. Architectures PaddleMIX has no module for are refused; numeric
    semantics it computes differently are reported by :func:`paddlemix_differences`.
    """
    from ..models.config import CLIPConfig

    cfg = CLIPConfig.from_model_cfg({k: v for k, v in model_cfg.items() if k != "preprocess_cfg"})
    vc, tc = cfg.vision, cfg.text
    eva = vc.eva_model_name is not None  # the label of the variant picks PaddleMIX's EVACLIP class
    if vc.block_type != "attention" or tc.block_type != "attention":
        raise _refuse("MLP-Mixer towers")
    for name, tower_cfg in (("vision", vc), ("text", tc)):
        if tower_cfg.act_kwargs and tower_cfg.act_kwargs.get("approximate", "none") != "none":
            raise _refuse(f"the tanh-approximated GELU of the {name} tower")
    if vc.attentional_pool or vc.pos_embed_type != "learnable" or vc.use_rms_norm:
        raise _refuse("attentional pooling, fixed sin-cos position embeddings or RMSNorm")
    if vc.pool_type not in ("tok", "avg", "avg_all"):
        raise _refuse(f"vision pool_type {vc.pool_type!r}")
    if tc.embed_cls or tc.pool_type != "argmax" or tc.proj_type != "linear" or tc.proj_bias:
        raise _refuse(f"a text tower with embed_cls={tc.embed_cls}, pool_type={tc.pool_type!r}, "
                      f"proj_type={tc.proj_type!r}, proj_bias={tc.proj_bias}")
    if tc.layer_norm_eps() != 1e-5:
        raise _refuse(f"text norm eps {tc.norm_kwargs}")
    text_quick = tc.quick_gelu if tc.quick_gelu is not None else cfg.quick_gelu
    text = {"context_length": tc.context_length, "vocab_size": tc.vocab_size, "width": tc.width, "heads": tc.heads,
            "layers": tc.layers, "embed_dim": cfg.embed_dim}
    text.update({k: v for k, v, default in (
        ("quick_gelu", text_quick, False), ("mlp_ratio", tc.mlp_ratio, 4.0), ("ls_init_value", tc.ls_init_value, None),
        ("attn_mask", not tc.no_causal_mask, True), ("pad_id", tc.pad_id, 0)) if v != default})
    vision = {"image_size": vc.image_size, "patch_size": vc.patch_size, "width": vc.width, "layers": vc.layers,
              "head_width": vc.head_width, "mlp_ratio": vc.mlp_ratio, "embed_dim": cfg.embed_dim}
    mean_pool = vc.pool_type in ("avg", "avg_all")
    if eva:
        if vc.layer_norm_eps() != 1e-6:
            raise _refuse(f"EVA vision norm eps {vc.layer_norm_eps()} (its EVA tower uses 1e-6)")
        if vc.qkv_bias == "qkv":
            raise _refuse("an EVA vision tower with a k bias (qkv_bias 'qkv'; PaddleMIX's has q/v biases only)")
        vision.update({k: v for k, v, default in (
            ("qkv_bias", vc.qkv_bias == "qv", False), ("init_values", vc.ls_init_value, None),
            ("use_mean_pooling", mean_pool, True), ("rope", vc.rope, False), ("naiveswiglu", vc.naiveswiglu, False),
            ("subln", vc.subln, False), ("postnorm", vc.postnorm, False)) if v != default})
        if vc.rope:
            vision.update(pt_hw_seq_len=vc.pt_hw_seq_len, intp_freq=vc.intp_freq)
        vision["xattn"] = True  # as PaddleMIX's EVA configs are written; it only picks the attention kernel
        return {"model_type": "evaclip", "vision_cfg": vision, "text_cfg": text}
    if (vc.no_ln_pre or vc.postnorm or vc.rope or vc.naiveswiglu or vc.subln or vc.qkv_bias != "qkv"
            or vc.patch_bias or vc.proj_bias):
        raise _refuse("a CLIP vision tower without ln_pre or with EVA switches (set eva_model_name for an EVA tower)")
    if vc.layer_norm_eps() != 1e-5:
        raise _refuse(f"vision norm eps {vc.layer_norm_eps()}")
    if mean_pool:
        vision["global_average_pool"] = True
    if vc.ls_init_value is not None:
        vision["ls_init_value"] = vc.ls_init_value
    return {"model_type": "clip", "vision_cfg": vision, "text_cfg": text, "custom_text": bool(cfg.custom_text)}


def _split_cols(x: np.ndarray, parts: int) -> List[np.ndarray]:
    """Split a fused [in, parts * out] matrix (or [parts * out] bias) into its parts."""
    return [np.ascontiguousarray(p) for p in np.split(x, parts, axis=x.ndim - 1)]


def to_paddlemix_state_dict(sd: Dict[str, np.ndarray], legacy_cfg: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """paddlemix weights under PaddleMIX's names: the exact inverse of the ``paddlemix_legacy`` conversion.

    Nothing is transposed (both are Paddle, [in, out]); fused q/k/v and SwiGLU gate/value
    matrices are split back into PaddleMIX's separate projections.
    """
    from .key_maps import _EVA_BLOCK, _LEGACY_CLIP_BLOCK

    src = dict(sd)
    out: Dict[str, np.ndarray] = {}

    def move(ours: str, theirs: str, fn=None) -> None:
        if ours in src:
            value = src.pop(ours)
            out[theirs] = fn(value) if fn is not None else value

    def block_indices(prefix: str) -> List[int]:
        return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in src if k.startswith(prefix)})

    def split_attn(ours: str, theirs: str, names: str) -> None:
        for part in ("weight", "bias"):
            if f"{ours}attn.qkv.{part}" in src:
                for n, value in zip("qkv", _split_cols(src.pop(f"{ours}attn.qkv.{part}"), 3)):
                    if n in names or part == "weight":
                        out[f"{theirs}attn.{n}_proj.{part}"] = value

    def clip_block(ours: str, theirs: str) -> None:
        for their_name, our_name, _ in _LEGACY_CLIP_BLOCK:
            if not our_name.startswith("attn.qkv."):
                move(ours + our_name, theirs + their_name)
        split_attn(ours, theirs, "qkv")

    eva = legacy_cfg["model_type"] == "evaclip"
    swiglu = legacy_cfg["vision_cfg"].get("naiveswiglu", False)
    mean_pool = legacy_cfg["vision_cfg"].get("use_mean_pooling", True)
    move("logit_scale", "logit_scale")
    if eva:
        move("visual.class_embedding", "visual.cls_token", lambda x: x.reshape(1, 1, -1))
        move("visual.positional_embedding", "visual.pos_embed", lambda x: x.reshape(1, *x.shape))
        move("visual.patch_embed.weight", "visual.patch_embed.proj.weight")
        move("visual.patch_embed.bias", "visual.patch_embed.proj.bias")
        for i in block_indices("visual.transformer.blocks."):
            ours, theirs = f"visual.transformer.blocks.{i}.", f"visual.blocks.{i}."
            split_attn(ours, theirs, "")
            move(ours + "attn.q_bias", theirs + "attn.q_proj.bias")
            move(ours + "attn.v_bias", theirs + "attn.v_proj.bias")
            if swiglu:
                for part in ("weight", "bias"):
                    if f"{ours}mlp.fc1.{part}" in src:
                        w1, w2 = _split_cols(src.pop(f"{ours}mlp.fc1.{part}"), 2)
                        out[f"{theirs}mlp.w1.{part}"], out[f"{theirs}mlp.w2.{part}"] = w1, w2
                    move(f"{ours}mlp.fc2.{part}", f"{theirs}mlp.w3.{part}")
            for their_name, our_name, _ in _EVA_BLOCK:
                if not their_name.startswith(("attn.qkv.", "attn.q_bias", "attn.v_bias", "mlp.w3.")):
                    move(ours + our_name, theirs + their_name)
        norm = "fc_norm" if mean_pool else "norm"
        move("visual.norm.weight", f"visual.{norm}.weight")
        move("visual.norm.bias", f"visual.{norm}.bias")
        move("visual.head.weight", "visual.head.weight")
        move("visual.head.bias", "visual.head.bias")
        text = "text."
    else:
        move("visual.class_embedding", "visual.class_embedding")
        move("visual.positional_embedding", "visual.positional_embedding")
        move("visual.head.weight", "visual.proj")
        move("visual.patch_embed.weight", "visual.conv1.weight")
        move("visual.norm_pre.weight", "visual.ln_pre.weight")
        move("visual.norm_pre.bias", "visual.ln_pre.bias")
        for i in block_indices("visual.transformer.blocks."):
            clip_block(f"visual.transformer.blocks.{i}.", f"visual.transformer.resblocks.{i}.")
        move("visual.norm.weight", "visual.ln_post.weight")
        move("visual.norm.bias", "visual.ln_post.bias")
        text = "text." if legacy_cfg.get("custom_text") else ""
    move("text.text_projection.weight", text + "text_projection")
    move("text.positional_embedding", text + "positional_embedding")
    move("text.token_embedding.weight", text + "token_embedding.weight")
    for i in block_indices("text.transformer.blocks."):
        clip_block(f"text.transformer.blocks.{i}.", f"{text}transformer.resblocks.{i}.")
    move("text.ln_final.weight", text + "ln_final.weight")
    move("text.ln_final.bias", text + "ln_final.bias")
    if src:
        raise ConversionError(f"weights PaddleMIX's layout has no place for: {sorted(src)[:20]}")
    return out


class _PaddleMIXConfig(PretrainedConfig):
    """Writes config.json as PaddleMIX's CLIPConfig / EVACLIPConfig do (towers under both spellings)."""

    def __init__(self, vision_cfg=None, text_cfg=None, model_type="clip", custom_text=None, **kwargs):
        kwargs["return_dict"] = kwargs.pop("return_dict", True)
        super().__init__(**kwargs)
        self.vision_config = dict(vision_cfg or {})
        self.text_config = dict(text_cfg or {})
        self._model_type = model_type
        if custom_text is not None:
            self.custom_text = custom_text

    def to_dict(self, saving_file: bool = False) -> Dict[str, Any]:
        out = copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "_model_type"})
        out.update(text_cfg=self.text_config, vision_cfg=self.vision_config, model_type=self._model_type)
        return out


def write_paddlemix_dir(
    sd: Dict[str, np.ndarray], model_cfg: Dict[str, Any], out_dir: Union[str, Path], *, overwrite: bool = False
) -> Path:
    """Write ``config.json`` + ``model_state.pdparams`` in PaddleMIX's layout and config schema.

    ``sd`` holds paddlemix names and Paddle orientation (what ``model.state_dict()`` or
    :func:`paddlemix.zoo.model_dir.convert_weights` gives); bfloat16 arrives as its uint16 bits and
    is stored as bfloat16. Differences in how PaddleMIX will compute with these weights are
    logged, since the directory itself cannot say so.
    """
    import paddle

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} already exists and is not empty; remove it or pass overwrite=True")
    legacy = model_cfg_to_legacy_config(model_cfg)
    for difference in paddlemix_differences(model_cfg):
        logger.warning("PaddleMIX will compute this model differently: %s", difference)
    tensors = to_paddlemix_state_dict(sd, legacy)
    out_dir.mkdir(parents=True, exist_ok=True)
    arch = "EVACLIP" if legacy["model_type"] == "evaclip" else "CLIP"
    kwargs = {"custom_text": legacy["custom_text"]} if "custom_text" in legacy else {}
    _PaddleMIXConfig(legacy["vision_cfg"], legacy["text_cfg"], legacy["model_type"], architectures=[arch],
                     **kwargs).save_pretrained(str(out_dir))
    state = {}
    for name, value in tensors.items():
        if value.dtype == np.uint16:  # bfloat16 bits: widening is exact, and the cast back restores them
            state[name] = paddle.to_tensor(bf16_bits_to_float32(value)).astype("bfloat16")
        else:
            state[name] = paddle.to_tensor(value)
    paddle.save(state, str(out_dir / LEGACY_WEIGHTS_NAME))
    logger.info("wrote %s in PaddleMIX's layout (%s, %d tensors)", out_dir, arch, len(state))
    return out_dir
