"""MLP-Mixer image and text towers (Tolstikhin et al., arXiv:2105.01601) for two-tower CLIP.

A Mixer block replaces self-attention by a *token-mixing* MLP applied along the sequence axis
(the same MLP for every channel), followed by the usual *channel-mixing* MLP; both are pre-norm
residual branches. The token-mixing weights are tied to positions, so a tower has a fixed
sequence length (the image grid, the text context length) and needs no position embedding.

Text is causal by default: the token-mixing MLP uses MADE-style masks (Germain et al.,
arXiv:1502.03509). Each hidden unit is assigned a position ``p``; its input weights see only
tokens ``<= p`` and its output weights feed only tokens ``>= p``, so output ``i`` depends on
inputs ``<= i`` exactly, as under a causal attention mask, and pooling at the EOT token
(``argmax``) ignores the padding after it. The masked weights stay stored (the parameter count is
the dense one), which keeps checkpoints and the vision/text code paths identical.

The towers keep the attribute names of the ViT towers (``transformer.blocks``, ``patch_embed``,
``head``, ``ln_final``, ``text_projection``) so :class:`~paddlemix.models.clip_model.CLIP`, the
checkpoint loader (which recognises this project's layout by ``*.transformer.blocks.*``) and the
training code treat them like any other tower.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .config import ConfigError, TextCfg, VisionCfg
from .layers import GELU, DropPath, LayerNorm, Mlp
from .transformer import (
    TextTransformer,
    VisionTransformer,
    _drop_path_rates,
    _lock_groups,
    _normal,
    _projection,
    _run_blocks,
    _text_projection,
    _tower_output,
    to_2tuple,
)

__all__ = [
    "TokenMixingMlp",
    "MixerBlock",
    "MixerStack",
    "MixerVisionTower",
    "MixerTextTower",
    "build_mixer_vision_tower",
    "build_mixer_text_tower",
    "made_masks",
]

BLOCK_TYPES = ("attention", "mixer")


def made_masks(num_tokens: int, hidden_dim: int) -> "tuple[np.ndarray, np.ndarray]":
    """Causal masks for a ``num_tokens -> hidden_dim -> num_tokens`` MLP, in Paddle's ``[in, out]`` layout.

    Hidden unit ``j`` sits at position ``p_j = floor(j * num_tokens / hidden_dim)`` (units spread
    evenly over the positions), ``mask_in[i, j] = i <= p_j`` and ``mask_out[j, o] = p_j <= o``.
    """
    pos = (np.arange(hidden_dim) * num_tokens) // hidden_dim
    tokens = np.arange(num_tokens)
    mask_in = (tokens[:, None] <= pos[None, :]).astype(np.float32)
    mask_out = (pos[:, None] <= tokens[None, :]).astype(np.float32)
    return mask_in, mask_out


class TokenMixingMlp(nn.Layer):
    """Two-layer MLP over the sequence axis of ``[B, L, C]``, shared by all channels."""

    def __init__(
        self,
        num_tokens: int,
        hidden_dim: int,
        act_layer: Callable[[], nn.Layer] = GELU,
        causal: bool = False,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.causal = causal
        self.fc1 = nn.Linear(num_tokens, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, num_tokens)
        if causal:
            mask_in, mask_out = made_masks(num_tokens, hidden_dim)
            self.register_buffer("mask_in", paddle.to_tensor(mask_in), persistable=False)
            self.register_buffer("mask_out", paddle.to_tensor(mask_out), persistable=False)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x.transpose([0, 2, 1])  # [B, C, L]: the MLP runs along L
        w1, w2 = self.fc1.weight, self.fc2.weight
        if self.causal:
            w1 = w1 * self.mask_in.astype(w1.dtype)
            w2 = w2 * self.mask_out.astype(w2.dtype)
        x = self.act(F.linear(x, w1, self.fc1.bias))
        x = F.linear(x, w2, self.fc2.bias)
        return x.transpose([0, 2, 1])

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, causal={self.causal}"


class MixerBlock(nn.Layer):
    """``x + token_mix(norm1(x))`` then ``x + channel_mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        token_dim: int,
        channel_dim: int,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        causal: bool = False,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mlp = TokenMixingMlp(num_tokens, token_dim, act_layer=act_layer, causal=causal)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, channel_dim, act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.drop_path(self.token_mlp(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MixerStack(nn.Layer):
    """A stack of :class:`MixerBlock`; ``grad_checkpointing`` recomputes each block in backward."""

    def __init__(
        self,
        width: int,
        layers: int,
        num_tokens: int,
        token_dim: int,
        channel_dim: int,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        causal: bool = False,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        rates = _drop_path_rates(drop_path_rate, layers)
        self.blocks = nn.LayerList(
            [
                MixerBlock(width, num_tokens, token_dim, channel_dim, act_layer, norm_layer, causal, rates[i])
                for i in range(layers)
            ]
        )
        self._init_weights(num_tokens, token_dim, width, channel_dim)

    def _init_weights(self, num_tokens: int, token_dim: int, width: int, channel_dim: int) -> None:
        """Unit-gain input layers, depth-scaled output layers (GPT-2 / open_clip), zero biases.

        With Paddle's default Xavier init every residual branch starts as large as the stream,
        so the token identity (the embedding) is drowned at init and training on small data can
        collapse to identical features; scaling each branch's output by ``(2 * layers) ** -0.5``
        keeps the stream dominated by the input at the start.
        """
        depth = (2 * max(self.layers, 1)) ** -0.5
        for blk in self.blocks:
            for fc, std in (
                (blk.token_mlp.fc1, num_tokens**-0.5),
                (blk.token_mlp.fc2, token_dim**-0.5),
                (blk.mlp.fc1, width**-0.5),
                (blk.mlp.fc2, channel_dim**-0.5 * depth),
            ):
                nn.initializer.Normal(std=std)(fc.weight)
                nn.initializer.Constant(0.0)(fc.bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return _run_blocks(self, x)


class MixerVisionTower(nn.Layer):
    """Patch embedding, Mixer blocks, final norm, mean over patches, projection.

    There is no class token and no position embedding: the token-mixing weights are per
    position. The input resolution is therefore part of the architecture.
    """

    def __init__(
        self,
        image_size: Union[int, Sequence[int]],
        patch_size: Union[int, Sequence[int]],
        width: int,
        layers: int,
        token_dim: int,
        channel_dim: int,
        output_dim: int,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        drop_path_rate: float = 0.0,
        pool_type: str = "avg",
        proj_bias: bool = False,
        output_tokens: bool = False,
    ):
        super().__init__()
        if pool_type not in ("avg", "none"):
            raise ConfigError(f"a Mixer image tower has no class token: pool_type must be 'avg' or 'none', got {pool_type!r}")
        self.image_size = to_2tuple(image_size)
        self.patch_size = to_2tuple(patch_size)
        if self.image_size[0] % self.patch_size[0] or self.image_size[1] % self.patch_size[1]:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.width = width
        self.output_dim = output_dim
        self.pool_type = pool_type
        self.output_tokens = output_tokens
        # MLP-Mixer's stem is a biased per-patch linear map.
        self.patch_embed = nn.Conv2D(3, width, kernel_size=self.patch_size, stride=self.patch_size)
        self.transformer = MixerStack(
            width, layers, self.num_tokens, token_dim, channel_dim, act_layer, norm_layer, False, drop_path_rate
        )
        self.norm = norm_layer(width)
        self.head = _projection(width, output_dim, width**-0.5, proj_bias)

    set_grad_checkpointing = VisionTransformer.set_grad_checkpointing

    def lock(self, unlocked_groups: int = 0) -> None:
        """Freeze for LiT; groups first to last: stem, each block but the last, last block + norm, head."""
        blocks = list(self.transformer.blocks)
        groups: List[List] = [[self.patch_embed]] + [[b] for b in blocks[:-1]]
        groups += [[blocks[-1], self.norm], [self.head]]
        _lock_groups(self, groups, unlocked_groups)

    def forward(self, x: paddle.Tensor):
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"a Mixer tower is built for {self.image_size} images (its token-mixing weights are per "
                f"patch position), got {tuple(x.shape[-2:])}; resize the input or build it with that image_size"
            )
        x = self.patch_embed(x).flatten(2).transpose([0, 2, 1])  # [B, N, C]
        x = self.norm(self.transformer(x))
        pooled = x.mean(axis=1) if self.pool_type == "avg" else x
        return _tower_output(pooled, x, self.head, self.output_tokens)


class MixerTextTower(nn.Layer):
    """Token embedding, (causal) Mixer blocks, final norm, pooling, projection.

    Inputs shorter than ``context_length`` are right-padded with ``pad_id``: for the causal
    tower this changes no output at the real positions, so it is exact.
    """

    def __init__(
        self,
        context_length: int,
        vocab_size: int,
        width: int,
        layers: int,
        token_dim: int,
        channel_dim: int,
        output_dim: Optional[int],
        causal: bool = True,
        pool_type: str = "argmax",
        pad_id: int = 0,
        eos_id: int = 2,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        proj_type: str = "linear",
        proj_bias: bool = False,
        output_tokens: bool = False,
    ):
        super().__init__()
        if pool_type not in ("first", "last", "argmax", "eos", "none"):
            raise ConfigError(f"text pool_type must be first/last/argmax/eos/none, got {pool_type!r}")
        if causal and pool_type == "first":
            raise ConfigError("a causal Mixer text tower cannot pool the first token: it has seen only itself")
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.output_dim = output_dim
        self.causal = causal
        self.pool_type = pool_type
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.output_tokens = output_tokens
        self.cls_emb = None  # CLIP asks every text tower; Mixer towers have none
        self.token_embedding = nn.Embedding(vocab_size, width, weight_attr=_normal(0.02))
        self.transformer = MixerStack(width, layers, context_length, token_dim, channel_dim, act_layer, norm_layer, causal)
        self.ln_final = norm_layer(width)
        self.text_projection = _text_projection(width, output_dim, proj_type, proj_bias)

    # Same attribute names as the text transformer, so its freezing, checkpointing and pooling apply.
    set_grad_checkpointing = TextTransformer.set_grad_checkpointing
    lock = TextTransformer.lock
    _pool = TextTransformer._pool

    def forward(self, text: paddle.Tensor):
        B, L = text.shape
        if L > self.context_length:
            raise ValueError(
                f"text of length {L} exceeds the Mixer context length {self.context_length} (its token-mixing "
                "weights are per position); tokenize with that context length"
            )
        if L < self.context_length:
            pad = paddle.full([B, self.context_length - L], self.pad_id, dtype=text.dtype)
            text = paddle.concat([text, pad], axis=1)
        x = self.ln_final(self.transformer(self.token_embedding(text)))
        return _tower_output(self._pool(x, text), x[:, :L], self.text_projection, self.output_tokens)


def _check_mixer_cfg(cfg: Union[VisionCfg, TextCfg], unsupported: dict) -> None:
    if cfg.block_type not in BLOCK_TYPES:
        raise ConfigError(f"block_type must be one of {BLOCK_TYPES}, got {cfg.block_type!r}")
    bad = sorted(k for k, default in unsupported.items() if getattr(cfg, k) != default)
    if bad:
        raise ConfigError(f"{type(cfg).__name__} keys {bad} have no meaning for a Mixer tower; remove them")
    if cfg.token_mlp_ratio <= 0:
        raise ConfigError(f"token_mlp_ratio must be > 0, got {cfg.token_mlp_ratio}")


def build_mixer_vision_tower(
    embed_dim: int, cfg: VisionCfg, act_layer: Callable[[], nn.Layer], norm_layer: Callable[[int], nn.Layer]
) -> MixerVisionTower:
    _check_mixer_cfg(
        cfg,
        {
            "patch_dropout": 0.0,  # the token count is fixed by the token-mixing weights
            "attentional_pool": False,
            "eva_model_name": None,
            "patch_bias": False,
            "proj_bias": False,
            "rope": False,
            "naiveswiglu": False,
            "subln": False,
            "postnorm": False,
            "ls_init_value": None,
            "pos_embed_type": "learnable",
        },
    )
    if isinstance(cfg.layers, (list, tuple)):
        raise ConfigError(f"vision_cfg.layers={cfg.layers!r} must be an int for a Mixer tower")
    return MixerVisionTower(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        token_dim=int(cfg.width * cfg.token_mlp_ratio),
        channel_dim=int(cfg.width * cfg.mlp_ratio),
        output_dim=embed_dim,
        act_layer=act_layer,
        norm_layer=norm_layer,
        drop_path_rate=cfg.drop_path_rate,
        pool_type=cfg.pool_type,
        output_tokens=cfg.output_tokens,
    )


def build_mixer_text_tower(
    embed_dim: int, cfg: TextCfg, act_layer: Callable[[], nn.Layer], norm_layer: Callable[[int], nn.Layer]
) -> MixerTextTower:
    _check_mixer_cfg(cfg, {"embed_cls": False, "use_pad_mask": False, "ls_init_value": None})
    return MixerTextTower(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        layers=cfg.layers,
        token_dim=int(cfg.width * cfg.token_mlp_ratio),
        channel_dim=int(cfg.width * cfg.mlp_ratio),
        output_dim=embed_dim,
        causal=not cfg.no_causal_mask,
        pool_type=cfg.pool_type,
        pad_id=cfg.pad_id,
        eos_id=cfg.eos_id,
        act_layer=act_layer,
        norm_layer=norm_layer,
        proj_type=cfg.proj_type,
        proj_bias=cfg.proj_bias,
        output_tokens=cfg.output_tokens,
    )
