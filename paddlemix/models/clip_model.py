"""The two-tower CLIP model as a PaddleNLP ``PretrainedModel``.

``CLIP`` is what ``create_model`` returns for every family (OpenAI/OpenCLIP, CLIPA,
EVA-CLIP): the families differ only in the tower configs. Being a
``PretrainedModel`` gives ``save_pretrained`` / ``from_pretrained`` on a local
directory (``config.json`` + weights) and plugs the model into PaddleNLP's Trainer.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Dict, Optional, Set, Tuple, Union

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddlenlp.transformers import PretrainedModel

from .config import CLIPConfig, ConfigError, TextCfg, VisionCfg
from .layers import get_act_layer, get_norm_layer
from .mixer import build_mixer_text_tower, build_mixer_vision_tower
from .rope import RotaryEmbedding2D
from .transformer import TextTransformer, VisionTransformer, to_2tuple

logger = logging.getLogger(__name__)

__all__ = ["CLIP", "build_vision_tower", "build_text_tower"]


def _act_layer(act_kwargs: Optional[dict], quick_gelu: bool) -> Callable[[], nn.Layer]:
    """The activation, with open_clip's ``act_kwargs`` for ``nn.GELU``.

    Only ``approximate`` is accepted: 'tanh' is the GELU big_vision (CLIPA's JAX code) trains
    with, and weights trained with it need it; 'none' is the exact erf GELU.
    """
    kwargs = dict(act_kwargs or {})
    approximate = kwargs.pop("approximate", "none")
    if kwargs:
        raise ConfigError(f"act_kwargs: only 'approximate' is supported, got extra keys {sorted(kwargs)}")
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"act_kwargs approximate must be 'none' or 'tanh', got {approximate!r}")
    if approximate == "tanh":
        if quick_gelu:
            raise ConfigError("act_kwargs approximate='tanh' contradicts quick_gelu=True; choose one activation")
        return functools.partial(nn.GELU, approximate=True)
    return get_act_layer(quick_gelu)


def build_vision_tower(embed_dim: int, cfg: VisionCfg, quick_gelu: bool = False) -> nn.Layer:
    """Translate a :class:`VisionCfg` into tower arguments.

    Every variant is an explicit field here; EVA-CLIP's named variant was already written out
    into those fields when the config was read (:func:`~paddlemix.models.config.eva_to_explicit`).
    """
    tower_quick_gelu = cfg.quick_gelu if cfg.quick_gelu is not None else quick_gelu
    eps = cfg.layer_norm_eps()
    if cfg.block_type != "attention":
        norm = get_norm_layer(eps=eps, fused=cfg.fusedLN)
        return build_mixer_vision_tower(embed_dim, cfg, _act_layer(cfg.act_kwargs, tower_quick_gelu), norm)
    if isinstance(cfg.layers, (list, tuple)):
        raise ConfigError(f"vision_cfg.layers={cfg.layers!r} describes a ResNet tower, which is not implemented")
    if cfg.width % cfg.head_width != 0:
        raise ConfigError(f"vision_cfg.width {cfg.width} is not divisible by head_width {cfg.head_width}")
    heads = cfg.width // cfg.head_width
    norm_layer = get_norm_layer(use_rms_norm=cfg.use_rms_norm, eps=eps, fused=cfg.fusedLN)
    attn_norm_layer, mlp_norm_layer = (
        get_norm_layer(use_rms_norm=cfg.use_rms_norm, eps=sub_eps, fused=cfg.fusedLN) if sub_eps is not None else None
        for sub_eps in (cfg.attn_norm_eps, cfg.mlp_norm_eps)
    )
    rope = None
    if cfg.rope:
        grid = to_2tuple(cfg.image_size)[0] // to_2tuple(cfg.patch_size)[0]
        rope = RotaryEmbedding2D(
            head_dim=cfg.head_width,
            grid_size=grid,
            pt_seq_len=cfg.pt_hw_seq_len,
            intp_freq=cfg.intp_freq,
        )
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=heads,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=embed_dim,
        ls_init_value=cfg.ls_init_value,
        patch_dropout=cfg.patch_dropout,
        pos_embed_type=cfg.pos_embed_type,
        no_ln_pre=cfg.no_ln_pre,
        pool_type=cfg.pool_type,
        final_ln_after_pool=cfg.final_ln_after_pool,
        attentional_pool=cfg.attentional_pool,
        attn_pooler_queries=cfg.attn_pooler_queries,
        attn_pooler_heads=cfg.attn_pooler_heads,
        act_layer=_act_layer(cfg.act_kwargs, tower_quick_gelu),
        norm_layer=norm_layer,
        patch_bias=cfg.patch_bias,
        proj_bias=cfg.proj_bias,
        qkv_bias=cfg.qkv_bias,
        swiglu=cfg.naiveswiglu,
        subln=cfg.subln,
        postnorm=cfg.postnorm,
        drop_path_rate=cfg.drop_path_rate,
        rope=rope,
        use_fused_attn=cfg.xattn,
        output_tokens=cfg.output_tokens,
        attn_norm_layer=attn_norm_layer,
        mlp_norm_layer=mlp_norm_layer,
    )


def build_text_tower(embed_dim: int, cfg: TextCfg, quick_gelu: bool = False) -> nn.Layer:
    if cfg.quick_gelu is not None:
        quick_gelu = cfg.quick_gelu
    if cfg.block_type != "attention":
        norm = get_norm_layer(eps=cfg.layer_norm_eps(), fused=cfg.fusedLN)
        return build_mixer_text_tower(embed_dim, cfg, _act_layer(cfg.act_kwargs, quick_gelu), norm)
    if cfg.width % cfg.heads != 0:
        raise ConfigError(f"text_cfg.width {cfg.width} is not divisible by heads {cfg.heads}")
    return TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=embed_dim,
        ls_init_value=cfg.ls_init_value,
        embed_cls=cfg.embed_cls,
        no_causal_mask=cfg.no_causal_mask,
        use_pad_mask=cfg.use_pad_mask,
        correct_cls_mask=cfg.correct_cls_mask,
        pad_id=cfg.pad_id,
        eos_id=cfg.eos_id,
        pool_type=cfg.pool_type,
        proj_type=cfg.proj_type,
        proj_bias=cfg.proj_bias,
        act_layer=_act_layer(cfg.act_kwargs, quick_gelu),
        norm_layer=get_norm_layer(eps=cfg.layer_norm_eps(), fused=cfg.fusedLN),
        use_fused_attn=cfg.xattn,
        output_tokens=cfg.output_tokens,
    )


class CLIP(PretrainedModel):
    """Contrastive image-text model: ``visual`` and ``text`` towers plus a learned temperature.

    ``logit_scale`` is stored in log space, as in every reference; ``logit_bias`` exists
    only for sigmoid-loss models (``init_logit_bias`` set).
    """

    config_class = CLIPConfig
    base_model_prefix = "clip"

    def __init__(self, config: CLIPConfig):
        super().__init__(config)
        self.visual = build_vision_tower(config.embed_dim, config.vision, config.quick_gelu)
        self.text = build_text_tower(config.embed_dim, config.text, config.quick_gelu)
        # Shape [1] as in PaddleMIX (open_clip uses a 0-d tensor; loading converts either way).
        self.logit_scale = self.create_parameter(
            [1], default_initializer=nn.initializer.Constant(config.init_logit_scale)
        )
        if config.init_logit_bias is not None:
            self.logit_bias = self.create_parameter(
                [1], default_initializer=nn.initializer.Constant(config.init_logit_bias)
            )
        else:
            self.logit_bias = None
        self.output_dict = False
        # Where the loaded weights came from (set by paddlemix.create_model); None: as initialised.
        self.weights_source: Optional[str] = None

    def save_pretrained(
        self, save_dir: str, *args, safe_serialization: bool = True, layout: Optional[str] = None, **kwargs
    ):
        """PaddleNLP's save, defaulting to safetensors: weights others load should not be pickles.

        ``layout="paddlemix"`` (or ``"paddlemix_legacy"``, the loaders' name for it) instead writes
        PaddleMIX's own directory, ``config.json`` in its schema + ``model_state.pdparams`` under its
        names, which PaddleMIX's ``CLIP`` / ``EVACLIP.from_pretrained`` read.
        """
        if layout is not None:
            writer = CLIP._layout_writers.get(layout)
            if writer is None:
                raise ValueError(
                    f"layout must be None (this project's directory) or one of {sorted(CLIP._layout_writers)}, got {layout!r}"
                )
            if args or kwargs:
                raise TypeError(f"layout={layout!r} takes no further save arguments, got {args} {sorted(kwargs)}")
            return writer(self, save_dir)
        return super().save_pretrained(save_dir, *args, safe_serialization=safe_serialization, **kwargs)

    # How a name or directory becomes weights is the model zoo's business: ``paddlemix.zoo``
    # registers its loader here when imported (importing paddlemix does), so this module imports
    # nothing from the zoo and the dependency points one way.
    _pretrained_loader: Optional[Callable[..., "CLIP"]] = None
    # Other projects' directory layouts (PaddleMIX's) are written by the zoo, registered the same way.
    _layout_writers: Dict[str, Callable[["CLIP", str], object]] = {}

    @staticmethod
    def register_layout_writer(layout: str, writer: Callable[["CLIP", str], object]) -> None:
        """Make ``save_pretrained(dir, layout=layout)`` call ``writer(model, dir)``."""
        CLIP._layout_writers[layout] = writer

    @staticmethod
    def register_pretrained_loader(loader: Callable[..., "CLIP"]) -> None:
        """Set the function behind ``from_pretrained``: ``loader(cls, name_or_path, *args, dtype=..., **kwargs)``."""
        CLIP._pretrained_loader = loader

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype: Optional[str] = None, **kwargs):
        """Build from ``config.json`` and load the weights with the strict, pickle-free loader.

        Accepts what ``create_model`` accepts (the one resolver, ``paddlemix.zoo.resolve``): a
        ``save_pretrained`` or PaddleMIX directory (safetensors, sharded or legacy ``.pdparams``),
        a model-zoo name, or an explicit ``local-dir:PATH``, ``hf-hub:ORG/REPO`` or ``paddlemix:NAME``;
        a name that is also an architecture means its zoo weights here. Unlike PaddleNLP's loader,
        a third-party directory never reaches a full pickle load, and missing or unexpected
        weights are an error.
        """
        if CLIP._pretrained_loader is None:
            raise RuntimeError("CLIP.from_pretrained needs the model zoo's loader; `import paddlemix.zoo` registers it")
        return CLIP._pretrained_loader(cls, pretrained_model_name_or_path, *args, dtype=dtype, **kwargs)

    # PaddleNLP calls this for layers whose weights were not in a checkpoint; the towers
    # initialise themselves in their constructors, so nothing is re-initialised here.
    def _init_weights(self, layer: nn.Layer) -> None:
        return None

    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def image_size(self) -> Tuple[int, int]:
        return self.visual.image_size

    def encode_image(self, image: paddle.Tensor, normalize: bool = False) -> paddle.Tensor:
        features = self.visual(image.astype(self.visual.patch_embed.weight.dtype))
        if isinstance(features, tuple):
            features = features[0]
        return F.normalize(features, axis=-1) if normalize else features

    def encode_text(self, text: paddle.Tensor, normalize: bool = False) -> paddle.Tensor:
        if paddle.in_dynamic_mode() and text.shape[-1] > self.context_length:
            raise ValueError(
                f"text has {text.shape[-1]} tokens per row, more than this model's context length "
                f"{self.context_length}: tokenize with context_length={self.context_length} "
                "(paddlemix.get_tokenizer(model) does)"
            )
        features = self.text(text)
        if isinstance(features, tuple):
            features = features[0]
        return F.normalize(features, axis=-1) if normalize else features

    def get_logits(self, image: paddle.Tensor, text: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``(logits_per_image, logits_per_text)``: scaled cosine similarities (+ bias)."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits = self.logit_scale.exp() * paddle.matmul(image_features, text_features, transpose_y=True)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T

    def forward(
        self, image: Optional[paddle.Tensor] = None, text: Optional[paddle.Tensor] = None
    ) -> Union[Dict[str, paddle.Tensor], Tuple[paddle.Tensor, ...]]:
        """open_clip's contract: normalised features and ``logit_scale.exp()`` (+ bias)."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        scale = self.logit_scale.exp()
        # A fresh tensor, not the parameter itself: paddle.DataParallel's gradient reducer
        # fails ("has been ready before") when a parameter is returned from forward as is.
        bias = self.logit_bias * 1.0 if self.logit_bias is not None else None
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features, "logit_scale": scale}
            if bias is not None:
                out["logit_bias"] = bias
            return out
        if bias is not None:
            return image_features, text_features, scale, bias
        return image_features, text_features, scale

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        self.visual.lock(unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0) -> None:
        self.text.lock(unlocked_layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> Set[str]:
        """Parameter names excluded from weight decay besides biases, norms and 1-D gains."""
        names = {"logit_scale", "visual.class_embedding", "visual.positional_embedding", "text.positional_embedding"}
        if self.text.cls_emb is not None:
            names.add("text.cls_emb")
        if self.logit_bias is not None:
            names.add("logit_bias")
        return names
