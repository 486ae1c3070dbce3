"""Model configuration as data.

The tower configs accept open_clip's schema (``vision_cfg`` / ``text_cfg`` keys)
and EVA-CLIP's extra switches under the same names, so a config JSON from either
project builds the same towers here. Unknown keys are an error: a typo in a
config must not silently build a different model.

Every architectural variant is an explicit field (``norm_eps``, ``patch_bias``,
``proj_bias``, ``no_ln_pre``, ``qkv_bias`` mode, ``pool_type``, per-tower
``quick_gelu``). EVA-CLIP configs select theirs with a name (``eva_model_name``);
:func:`eva_to_explicit` translates that name into the explicit fields once, when the
config is read, so the model code never looks at the name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from paddlenlp.transformers import PretrainedConfig

from ..errors import PaddleMIXError

__all__ = ["VisionCfg", "TextCfg", "CLIPConfig", "ConfigError", "check_tower_values", "eva_to_explicit"]


class ConfigError(PaddleMIXError, ValueError):
    """A model config with unknown keys, wrong types or inconsistent values."""


# Keys of the reference schemas that select implementations this project does not have
# (timm / HF text backbones, ResNet towers). They are rejected with a specific message.
_UNSUPPORTED = {
    "timm_model_name": "timm image towers are not implemented; use a ViT config",
    "hf_model_name": "HF text backbones are not implemented; use the CLIP text transformer",
}


def _check_type(cls_name: str, name: str, value: Any, default: Any) -> None:
    if value is None or default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return
    if not ok:
        raise ConfigError(
            f"{cls_name}.{name} must be of type {type(default).__name__}, got {value!r} ({type(value).__name__})"
        )


def _unknown_keys(where: str, unknown, valid) -> ConfigError:
    """The error for misspelt keys, suggesting the closest valid key for each."""
    import difflib

    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return ConfigError(
        f"{where}: unknown keys {', '.join(hints)}; valid keys are {sorted(valid)}. "
        "Fix the spelling or remove them from the config."
    )


# Value ranges checked before anything is built: key -> (test, what the key must be).
_POSITIVE = (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
_RANGES: Dict[str, Dict[str, Tuple[Any, str]]] = {
    "VisionCfg": {
        "layers": _POSITIVE, "width": _POSITIVE, "head_width": _POSITIVE, "patch_size": _POSITIVE,
        "attn_pooler_queries": _POSITIVE, "attn_pooler_heads": _POSITIVE, "pt_hw_seq_len": _POSITIVE,
        "mlp_ratio": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "token_mlp_ratio": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "patch_dropout": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
        "drop_path_rate": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
        "pos_embed_type": (lambda v: v in ("learnable", "sin_cos_2d"), "'learnable' or 'sin_cos_2d'"),
        "pool_type": (lambda v: v in ("tok", "avg", "avg_all", "none"), "'tok', 'avg', 'avg_all' or 'none'"),
        "block_type": (lambda v: v in ("attention", "mixer"), "'attention' or 'mixer'"),
        "qkv_bias": (lambda v: v in ("qkv", "qv", "none"), "'qkv', 'qv', 'none', true ('qkv') or false ('none')"),
        "norm_eps": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
    },
    "TextCfg": {
        "context_length": _POSITIVE, "vocab_size": _POSITIVE, "width": _POSITIVE, "heads": _POSITIVE,
        "layers": _POSITIVE,
        "mlp_ratio": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "token_mlp_ratio": (lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        "pool_type": (lambda v: v in ("argmax", "eos", "first", "last", "none"),
                      "'argmax', 'eos', 'first', 'last' or 'none'"),
        "proj_type": (lambda v: v in ("linear", "none"), "'linear' or 'none'"),
        "block_type": (lambda v: v in ("attention", "mixer"), "'attention' or 'mixer'"),
    },
}
_TOWER_KEY = {"VisionCfg": "vision_cfg", "TextCfg": "text_cfg"}


def _image_size_pair(value: Any) -> Optional[Tuple[Any, Any]]:
    if isinstance(value, (list, tuple)):
        return tuple(value) if len(value) == 2 else None
    return (value, value)


def check_tower_values(cfg: "_TowerCfg") -> None:
    """Reject out-of-range tower settings (negative sizes, unknown modes, patches that do not tile).

    Called by ``from_dict`` once keys and types are known good, so a config that would build a
    tower with no blocks, or one that silently floors the patch grid, fails before building.
    """
    name = type(cfg).__name__
    where = _TOWER_KEY.get(name, name)
    for key, (test, valid) in _RANGES.get(name, {}).items():
        value = getattr(cfg, key, None)
        if value is not None and not test(value):
            raise ConfigError(f"{where}.{key} = {value!r} is out of range: it must be {valid}")
    if name == "VisionCfg":
        size = _image_size_pair(cfg.image_size)
        if size is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise ConfigError(f"{where}.image_size = {cfg.image_size!r} is out of range: it must be an integer >= 1 "
                              "or a pair [height, width] of them")
        if any(v % cfg.patch_size for v in size):
            raise ConfigError(f"{where}.image_size = {cfg.image_size!r} is not a multiple of {where}.patch_size = "
                              f"{cfg.patch_size}: the patches must tile the image (use a multiple of {cfg.patch_size})")
    if name == "TextCfg":
        if not 0 <= cfg.pad_id < cfg.vocab_size:
            raise ConfigError(f"{where}.pad_id = {cfg.pad_id} is out of range: it must be in [0, vocab_size = "
                              f"{cfg.vocab_size})")


def eva_to_explicit(d: Dict[str, Any]) -> Dict[str, Any]:
    """A vision tower dict with EVA-CLIP's implied settings written out as explicit fields.

    ``eva_model_name`` (any value) means EVA-CLIP's tower: norms with eps 1e-6, a biased patch
    embedding, no ``ln_pre``, attention biases on q and v only (``qkv_bias: true``), a biased
    head projection where the attention has biases, GELU whatever the model's ``quick_gelu``
    (EVA-CLIP ignores it for vision), and ``global_average_pool`` as open_clip's patch-token
    average normed after pooling. Idempotent, so a config this wrote reads back the same; the
    name stays in the config only as the label of the variant (PaddleMIX's ``EVACLIP`` layout).
    """
    d = dict(d)
    eva = d.get("eva_model_name") is not None
    qkv_bias = d.get("qkv_bias", True)
    if isinstance(qkv_bias, bool):  # open_clip / EVA-CLIP schema: a switch whose meaning is the family's
        qkv_bias = ("qv" if eva else "qkv") if qkv_bias else "none"
        d["qkv_bias"] = qkv_bias
    if not eva:
        return d
    norm_kwargs = d.get("norm_kwargs") or {}
    if d.get("norm_eps") is None and "eps" not in norm_kwargs and "epsilon" not in norm_kwargs:
        d["norm_eps"] = 1e-6
    d.update(no_ln_pre=True, patch_bias=True, proj_bias=qkv_bias != "none")
    if d.get("quick_gelu") is None:
        d["quick_gelu"] = False
    if d.get("global_average_pool"):
        pool_type = d.get("pool_type", "tok")
        if pool_type not in ("tok", "avg"):
            raise ConfigError(
                f"vision_cfg global_average_pool=True (patch-token average) contradicts pool_type={pool_type!r}; "
                "set one of them"
            )
        d.update(pool_type="avg", final_ln_after_pool=True)
    return d


class _TowerCfg:
    """Strict construction from a dict shared by both tower configs."""

    # Bool keys whose schema also accepts a string mode (bools are translated in __post_init__).
    _BOOL_MODES: Tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]):
        if d is not None and not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__} must be a JSON object of tower settings, got {type(d).__name__}: {d!r}")
        d = dict(d or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key, why in _UNSUPPORTED.items():
            if d.get(key):
                raise ConfigError(f"{cls.__name__}: {key}={d[key]!r} is not supported: {why}")
            d.pop(key, None)
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise _unknown_keys(cls.__name__, unknown, names)
        for k, v in d.items():
            f = names[k]
            default = f.default if f.default is not dataclasses.MISSING else None
            if k in cls._BOOL_MODES and isinstance(v, str):
                continue
            _check_type(cls.__name__, k, v, default)
        cfg = cls(**d)
        check_tower_values(cfg)
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def layer_norm_eps(self) -> float:
        """The eps of the tower's norms: ``norm_eps``, else open_clip's ``norm_kwargs`` eps, else 1e-5."""
        kwargs = dict(self.norm_kwargs or {})
        eps = kwargs.pop("eps", kwargs.pop("epsilon", None))
        if kwargs:
            raise ConfigError(f"norm_kwargs: only 'eps' is supported, got extra keys {sorted(kwargs)}")
        norm_eps = getattr(self, "norm_eps", None)
        if norm_eps is not None and eps is not None and float(eps) != float(norm_eps):
            raise ConfigError(f"norm_eps = {norm_eps!r} contradicts norm_kwargs eps = {eps!r}; set one of them")
        if norm_eps is not None:
            return float(norm_eps)
        return float(eps) if eps is not None else 1e-5


@dataclass
class VisionCfg(_TowerCfg):
    """The image tower: open_clip's keys, then the explicit variant switches (EVA-CLIP's among them),
    then EVA-CLIP's schema keys read into those switches, then the MLP-Mixer's.

    Each switch is a plain argument any config may set; none depends on a family's name.
    """

    layers: int = 12
    width: int = 768
    head_width: int = 64
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: Union[int, Tuple[int, int], list] = 224
    ls_init_value: Optional[float] = None
    patch_dropout: float = 0.0
    attentional_pool: bool = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8
    no_ln_pre: bool = False
    pos_embed_type: str = "learnable"  # 'learnable' | 'sin_cos_2d'
    final_ln_after_pool: bool = False
    # 'tok' | 'avg' (patch tokens) | 'avg_all' (every token, the class token included: PaddleMIX) | 'none'
    pool_type: str = "tok"
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None
    # This tower's activation; None follows the model's quick_gelu (PaddleMIX's vision tower is always GELU).
    quick_gelu: Optional[bool] = None
    # Norm eps of the tower; None: norm_kwargs' eps, else 1e-5.
    norm_eps: Optional[float] = None
    patch_bias: bool = False  # bias on the patch-embedding convolution (EVA)
    proj_bias: bool = False  # bias on the image projection head (EVA)
    # Attention input biases: 'qkv' (CLIP), 'qv' (BEiT / EVA: no k bias) or 'none'; true / false read as
    # 'qkv' / 'none', or as 'qv' / 'none' under eva_model_name.
    qkv_bias: Union[bool, str] = True
    # EVA-CLIP's name for its tower: read as the explicit settings above (see eva_to_explicit), kept as a label.
    eva_model_name: Optional[str] = None
    # Variants EVA-CLIP introduced; each is independent of eva_model_name.
    drop_path_rate: float = 0.0
    rope: bool = False
    pt_hw_seq_len: int = 16
    intp_freq: bool = False
    naiveswiglu: bool = False
    subln: bool = False
    postnorm: bool = False
    use_rms_norm: bool = False
    global_average_pool: bool = False  # EVA-CLIP schema: read as pool_type 'avg' normed after pooling
    # eps of the subln norms inside attention and the MLP; None: the tower's norm eps.
    attn_norm_eps: Optional[float] = None
    mlp_norm_eps: Optional[float] = None
    xattn: bool = True
    fusedLN: bool = False
    # MLP-Mixer tower (models/mixer.py): 'attention' builds the ViT, 'mixer' token-mixing MLPs.
    block_type: str = "attention"
    token_mlp_ratio: float = 0.5  # token-mixing hidden width as a fraction of `width`

    _BOOL_MODES = ("qkv_bias",)

    def __post_init__(self):
        # Direct construction and from_dict both pass here, so no VisionCfg carries an implied setting.
        for key, value in eva_to_explicit(dataclasses.asdict(self)).items():
            setattr(self, key, value)


@dataclass
class TextCfg(_TowerCfg):
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: Optional[float] = None
    embed_cls: bool = False
    pad_id: int = 0
    eos_id: int = 2
    no_causal_mask: bool = False
    use_pad_mask: bool = False
    correct_cls_mask: bool = False
    # Accepted for schema compatibility; open_clip 3.3.0's text tower does not use it either.
    final_ln_after_pool: bool = False
    pool_type: str = "argmax"  # 'argmax' | 'eos' | 'first' | 'last' | 'none'
    proj_bias: bool = False
    proj_type: str = "linear"  # 'linear' | 'none'
    output_tokens: bool = False
    act_kwargs: Optional[dict] = None
    norm_kwargs: Optional[dict] = None
    # This tower's activation; None follows the model's quick_gelu.
    quick_gelu: Optional[bool] = None
    hf_tokenizer_name: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    # EVA-CLIP text switches.
    xattn: bool = True
    fusedLN: bool = False
    # MLP-Mixer tower; causal unless no_causal_mask, so argmax (EOT) pooling stays valid.
    block_type: str = "attention"
    token_mlp_ratio: float = 0.5


class CLIPConfig(PretrainedConfig):
    """Configuration of a two-tower CLIP model, in open_clip's schema.

    ``vision_cfg`` / ``text_cfg`` are stored as plain dicts (so ``config.json`` is the
    open_clip model-config JSON plus PaddleNLP's bookkeeping) and validated into
    :class:`VisionCfg` / :class:`TextCfg` when a model is built.
    ``custom_text`` only changes open_clip's key layout, which the converters handle,
    so it is kept for round-tripping but has no effect on the model.
    """

    model_type = "paddlemix_clip"

    def __init__(
        self,
        embed_dim: int = 512,
        vision_cfg: Optional[Dict[str, Any]] = None,
        text_cfg: Optional[Dict[str, Any]] = None,
        quick_gelu: bool = False,
        init_logit_scale: float = 2.659260036932778,  # ln(1 / 0.07)
        init_logit_bias: Optional[float] = None,
        custom_text: bool = False,
        preprocess_cfg: Optional[Dict[str, Any]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.vision_cfg = VisionCfg.from_dict(vision_cfg).to_dict()
        self.text_cfg = TextCfg.from_dict(text_cfg).to_dict()
        self.quick_gelu = quick_gelu
        self.init_logit_scale = init_logit_scale
        self.init_logit_bias = init_logit_bias
        self.custom_text = custom_text
        self.preprocess_cfg = dict(preprocess_cfg or {})

    @property
    def vision(self) -> VisionCfg:
        return VisionCfg.from_dict(self.vision_cfg)

    @property
    def text(self) -> TextCfg:
        return TextCfg.from_dict(self.text_cfg)

    @classmethod
    def from_model_cfg(cls, cfg: Dict[str, Any], **kwargs) -> "CLIPConfig":
        """Build from an open_clip / EVA-CLIP model-config dict, rejecting unknown top-level keys."""
        known = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
                 "custom_text", "preprocess_cfg"}
        # Keys open_clip / EVA configs carry that do not change the architecture.
        ignored = {"cast_dtype", "multimodal_cfg", "nonscalar_logit_scale"}
        unknown = sorted(set(cfg) - known - ignored)
        if unknown:
            raise _unknown_keys("model config (top level)", unknown, known)
        if "embed_dim" not in cfg:
            raise ConfigError("model config: 'embed_dim' is required (the shared embedding width)")
        for key, example in (("embed_dim", 512), ("quick_gelu", False), ("init_logit_scale", 0.0),
                             ("init_logit_bias", 0.0), ("custom_text", False)):
            _check_type("model config", key, cfg.get(key), example)
        if not isinstance(cfg.get("embed_dim"), bool) and isinstance(cfg.get("embed_dim"), int) and cfg["embed_dim"] < 1:
            raise ConfigError(f"embed_dim = {cfg['embed_dim']!r} is out of range: it must be an integer >= 1")
        if cfg.get("preprocess_cfg") is not None and not isinstance(cfg["preprocess_cfg"], dict):
            raise ConfigError(f"model config.preprocess_cfg must be a JSON object, got {cfg['preprocess_cfg']!r}")
        args = {k: v for k, v in cfg.items() if k in known}
        args.update(kwargs)
        return cls(**args)

    @classmethod
    def check_model_cfg(cls, cfg: Dict[str, Any], source: Optional[Any] = None) -> None:
        """Validate an open_clip-schema model config before anything is built.

        Raises :class:`ConfigError` naming ``source`` (the file it came from), the key and its
        valid range.
        """
        try:
            cls.from_model_cfg(cfg)
        except ConfigError as err:
            if source is None:
                raise
            raise ConfigError(f"model config {source}: {err}") from None

    def to_model_cfg(self) -> Dict[str, Any]:
        """The open_clip-schema dict of this config (no PaddleNLP bookkeeping)."""
        out = {"embed_dim": self.embed_dim, "quick_gelu": self.quick_gelu, "vision_cfg": dict(self.vision_cfg),
               "text_cfg": dict(self.text_cfg), "init_logit_scale": self.init_logit_scale}
        if self.init_logit_bias is not None:
            out["init_logit_bias"] = self.init_logit_bias
        if self.preprocess_cfg:
            out["preprocess_cfg"] = dict(self.preprocess_cfg)
        if self.custom_text:  # the key layout to write back (open_clip CustomTextCLIP, PaddleMIX custom_text)
            out["custom_text"] = True
        return out
