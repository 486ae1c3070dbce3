"""The transformer block, the stack, and the two towers built from them.

One :class:`Block` serves OpenAI/OpenCLIP CLIP, CLIPA and EVA-CLIP: the differences
between those families (q/v-only biases, SwiGLU, sub-LN, post-norm, RMSNorm,
LayerScale, 2-D RoPE) are constructor switches, not subclasses.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import paddle
import paddle.nn as nn
from paddle.distributed.fleet.utils import recompute

from ..kernels import dispatch
from .layers import (
    Attention,
    AttentionalPooler,
    GELU,
    DropPath,
    LayerNorm,
    LayerScale,
    Mlp,
    PatchDropout,
    SwiGLU,
    sincos_2d_pos_embed,
)

__all__ = ["Block", "Transformer", "VisionTransformer", "TextTransformer", "to_2tuple"]


def to_2tuple(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(x, (list, tuple)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _normal(std: float) -> paddle.ParamAttr:
    return paddle.ParamAttr(initializer=nn.initializer.Normal(std=std))


# Helpers shared with the Mixer towers (mixer.py), which keep these towers' layout.


def _projection(in_dim: int, out_dim: int, std: float, bias: bool) -> nn.Linear:
    """A tower's output projection: normal(``std``) weights, a bias only if asked."""
    return nn.Linear(in_dim, out_dim, weight_attr=_normal(std), bias_attr=None if bias else False)


def _text_projection(width: int, output_dim: Optional[int], proj_type: str, proj_bias: bool) -> Optional[nn.Linear]:
    if proj_type == "none" or not output_dim:
        return None
    return _projection(width, output_dim, width**-0.5, proj_bias)


def _tower_output(pooled: paddle.Tensor, tokens: paddle.Tensor, proj: Optional[nn.Layer], output_tokens: bool):
    """Project the pooled features; return the tokens too when the tower was asked for them."""
    if proj is not None:
        pooled = proj(pooled)
    if output_tokens:
        return pooled, tokens
    return pooled


def _drop_path_rates(drop_path_rate: float, layers: int) -> List[float]:
    """Stochastic depth rising linearly from 0 at the first block to ``drop_path_rate`` at the last."""
    return [drop_path_rate * i / max(layers - 1, 1) for i in range(layers)]


def _run_blocks(stack: nn.Layer, x: paddle.Tensor, *args) -> paddle.Tensor:
    """``stack.blocks`` in order, each recomputed in backward under ``stack.grad_checkpointing``."""
    for blk in stack.blocks:
        if stack.grad_checkpointing and stack.training and not x.stop_gradient:
            x = recompute(blk, x, *args)
        else:
            x = blk(x, *args)
    return x


def _unfreeze(items: Sequence) -> None:
    """Make the parameters of each item (a layer or a parameter) trainable."""
    for item in items:
        for p in [item] if isinstance(item, paddle.Tensor) else item.parameters():
            p.stop_gradient = False


def _lock_groups(tower: nn.Layer, groups: Sequence[Sequence], unlocked_groups: int) -> None:
    """Freeze ``tower``, then unfreeze the last ``unlocked_groups`` of ``groups`` (LiT)."""
    for p in tower.parameters():
        p.stop_gradient = True
    if unlocked_groups > 0:
        for group in groups[-unlocked_groups:]:
            _unfreeze(group)


class Block(nn.Layer):
    """Residual attention + MLP block.

    Pre-norm (CLIP, EVA): ``x + ls(attn(norm1(x)))``. Post-norm (EVA-CLIP-18B):
    ``x + ls(norm1(attn(x)))``, the norm moved inside the branch.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ls_init_value: Optional[float] = None,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        qkv_bias: str = "qkv",
        swiglu: bool = False,
        subln: bool = False,
        postnorm: bool = False,
        drop_path: float = 0.0,
        use_fused_attn: bool = True,
        attn_norm_layer: Optional[Callable[[int], nn.Layer]] = None,
        mlp_norm_layer: Optional[Callable[[int], nn.Layer]] = None,
    ):
        super().__init__()
        self.postnorm = postnorm
        # The subln norms may differ from the block norms in eps (PaddleMIX builds some with the default).
        attn_norm = (attn_norm_layer or norm_layer) if subln else None
        mlp_norm = (mlp_norm_layer or norm_layer) if subln else None
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            inner_norm=attn_norm,
            use_fused_attn=use_fused_attn,
        )
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if swiglu:
            self.mlp = SwiGLU(dim, hidden, norm_layer=mlp_norm)
        else:
            self.mlp = Mlp(dim, hidden, act_layer=act_layer, norm_layer=mlp_norm)
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def plain_residual(self) -> bool:
        """Pre-norm without layer scale or drop path: ``x + branch(x)`` exactly, which lets the
        branch hand its skip connection to the kernel dispatch. Read from the current sub-layers,
        so a drop path or layer scale put in after construction is honoured."""
        return not self.postnorm and all(type(m) is nn.Identity for m in (self.ls1, self.ls2, self.drop_path))

    def forward(self, x, attn_mask=None, rope=None, rope_index=None):
        if self.postnorm:
            x = x + self.drop_path(self.ls1(self.norm1(self.attn(x, attn_mask, rope, rope_index))))
            return x + self.drop_path(self.ls2(self.norm2(self.mlp(x))))
        if self.plain_residual:  # each branch's last linear layer adds the skip connection
            x = self.attn(self.norm1(x), attn_mask, rope, rope_index, residual=x)
            return self.mlp(self.norm2(x), residual=x)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), attn_mask, rope, rope_index)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class Transformer(nn.Layer):
    """A stack of :class:`Block`; ``grad_checkpointing`` recomputes each block in backward."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init_value: Optional[float] = None,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        qkv_bias: str = "qkv",
        swiglu: bool = False,
        subln: bool = False,
        postnorm: bool = False,
        drop_path_rate: float = 0.0,
        use_fused_attn: bool = True,
        attn_norm_layer: Optional[Callable[[int], nn.Layer]] = None,
        mlp_norm_layer: Optional[Callable[[int], nn.Layer]] = None,
    ):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        rates = _drop_path_rates(drop_path_rate, layers)
        self.blocks = nn.LayerList(
            [
                Block(
                    width,
                    heads,
                    mlp_ratio,
                    ls_init_value=ls_init_value,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    qkv_bias=qkv_bias,
                    swiglu=swiglu,
                    subln=subln,
                    postnorm=postnorm,
                    drop_path=rates[i],
                    use_fused_attn=use_fused_attn,
                    attn_norm_layer=attn_norm_layer,
                    mlp_norm_layer=mlp_norm_layer,
                )
                for i in range(layers)
            ]
        )

    def forward(self, x, attn_mask=None, rope=None, rope_index=None):
        return _run_blocks(self, x, attn_mask, rope, rope_index)


class VisionTransformer(nn.Layer):
    """ViT image tower: patch embed, class token, position embedding, blocks, pooling, projection.

    Pooling follows open_clip: ``tok`` takes the class token, ``avg`` averages the
    patch tokens; ``avg_all`` averages every token, the class token included (what
    PaddleMIX's towers compute for mean pooling); ``final_ln_after_pool`` applies the final norm to the pooled vector
    instead of every token (CLIPA, EVA mean pooling). ``attentional_pool`` replaces both
    with a learned-query cross-attention (CoCa).
    """

    def __init__(
        self,
        image_size: Union[int, Sequence[int]],
        patch_size: Union[int, Sequence[int]],
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        output_dim: int,
        ls_init_value: Optional[float] = None,
        patch_dropout: float = 0.0,
        pos_embed_type: str = "learnable",
        no_ln_pre: bool = False,
        pool_type: str = "tok",
        final_ln_after_pool: bool = False,
        attentional_pool: bool = False,
        attn_pooler_queries: int = 256,
        attn_pooler_heads: int = 8,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        patch_bias: bool = False,
        proj_bias: bool = False,
        qkv_bias: str = "qkv",
        swiglu: bool = False,
        subln: bool = False,
        postnorm: bool = False,
        drop_path_rate: float = 0.0,
        rope: Optional[nn.Layer] = None,
        use_fused_attn: bool = True,
        output_tokens: bool = False,
        attn_norm_layer: Optional[Callable[[int], nn.Layer]] = None,
        mlp_norm_layer: Optional[Callable[[int], nn.Layer]] = None,
    ):
        super().__init__()
        if pool_type not in ("tok", "avg", "avg_all", "none"):
            raise ValueError(f"vision pool_type must be 'tok', 'avg', 'avg_all' or 'none', got {pool_type!r}")
        if pos_embed_type not in ("learnable", "sin_cos_2d"):
            raise ValueError(f"pos_embed_type must be 'learnable' or 'sin_cos_2d', got {pos_embed_type!r}")
        self.image_size = to_2tuple(image_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.width = width
        self.output_dim = output_dim
        self.pool_type = pool_type
        self.final_ln_after_pool = final_ln_after_pool
        self.output_tokens = output_tokens
        self.pos_embed_fixed = pos_embed_type == "sin_cos_2d"
        scale = width**-0.5
        num_pos = self.grid_size[0] * self.grid_size[1] + 1

        self.patch_embed = nn.Conv2D(
            3, width, kernel_size=self.patch_size, stride=self.patch_size, bias_attr=None if patch_bias else False
        )
        self.class_embedding = self.create_parameter([width], attr=_normal(scale))
        if pos_embed_type == "learnable":
            self.positional_embedding = self.create_parameter([num_pos, width], attr=_normal(scale))
        else:
            if self.grid_size[0] != self.grid_size[1]:
                raise ValueError(f"sin_cos_2d position embedding needs a square grid, got {self.grid_size}")
            table = sincos_2d_pos_embed(width, self.grid_size[0], cls_token=True)
            self.positional_embedding = self.create_parameter(
                [num_pos, width], default_initializer=nn.initializer.Assign(table)
            )
            self.positional_embedding.stop_gradient = True
        self.patch_dropout = PatchDropout(patch_dropout) if patch_dropout > 0 else None
        self.norm_pre = nn.Identity() if no_ln_pre else norm_layer(width)
        self.rope = rope
        self.transformer = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            ls_init_value=ls_init_value,
            act_layer=act_layer,
            norm_layer=norm_layer,
            qkv_bias=qkv_bias,
            swiglu=swiglu,
            subln=subln,
            postnorm=postnorm,
            drop_path_rate=drop_path_rate,
            use_fused_attn=use_fused_attn,
            attn_norm_layer=attn_norm_layer,
            mlp_norm_layer=mlp_norm_layer,
        )
        if attentional_pool:
            self.attn_pool = AttentionalPooler(
                output_dim, width, n_head=attn_pooler_heads, n_queries=attn_pooler_queries, norm_layer=norm_layer
            )
            pool_dim = output_dim
        else:
            self.attn_pool = None
            pool_dim = width
        self.norm = norm_layer(pool_dim)
        self.head = _projection(pool_dim, output_dim, scale, proj_bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def lock(self, unlocked_groups: int = 0) -> None:
        """Freeze the tower for LiT, leaving the last ``unlocked_groups`` groups trainable.

        Groups, first to last: embeddings (+ pre-norm), each block but the last, the last
        block with the final norm, the projection head (open_clip's grouping).
        """
        blocks = list(self.transformer.blocks)
        groups: List[List] = [[self.patch_embed, self.class_embedding, self.positional_embedding, self.norm_pre]]
        groups += [[b] for b in blocks[:-1]]
        groups += [[blocks[-1], self.norm] + ([self.attn_pool] if self.attn_pool is not None else [])]
        groups += [[self.head]]
        _lock_groups(self, groups, unlocked_groups)
        # A fixed sin-cos table is never trained, locked or not.
        if self.pos_embed_fixed:
            self.positional_embedding.stop_gradient = True

    def embed(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, Optional[paddle.Tensor]]:
        """Patch + class + position embeddings, patch dropout and pre-norm.

        Returns the tokens and the kept patch indices (``None`` when every patch is kept).
        """
        if dispatch.choose("patch_embed", x, params_fp32=self.patch_embed.weight.dtype == paddle.float32) == "matmul":
            x = self._patchify_matmul(x)
        else:
            x = self.patch_embed(x).flatten(2).transpose([0, 2, 1])  # [B, C, gh, gw] -> [B, N, C]
        B, C = x.shape[0], x.shape[2]
        cls = self.class_embedding.astype(x.dtype).reshape([1, 1, C]).expand([B, 1, C])
        x = paddle.concat([cls, x], axis=1)
        x = x + self.positional_embedding.astype(x.dtype)
        keep = None
        if self.patch_dropout is not None:
            x, keep = self.patch_dropout(x)
        return self.norm_pre(x), keep

    def _patchify_matmul(self, x: paddle.Tensor) -> paddle.Tensor:
        """The patch-embedding convolution as one GEMM over non-overlapping patches, [B, N, C].

        Kernel size equals stride, so the convolution is exactly patches @ weight: on the CPU
        that GEMM is several times faster than Paddle's conv2d, and it yields [B, N, C] directly
        instead of a [B, C, N] tensor whose strided transpose the next op copies again.
        """
        B, cin, h, w = x.shape
        ph, pw = self.patch_size
        gh, gw = h // ph, w // pw
        if gh * ph != h or gw * pw != w:
            x = x[:, :, : gh * ph, : gw * pw]  # what the stride-ph/pw convolution ignores
        patches = paddle.einsum("bchpwq->bhwcpq", x.reshape([B, cin, gh, ph, gw, pw]))
        weight = self.patch_embed.weight
        out = paddle.matmul(patches.reshape([B, gh * gw, cin * ph * pw]), weight.reshape([weight.shape[0], -1]),
                            transpose_y=True)
        return out if self.patch_embed.bias is None else out + self.patch_embed.bias

    def pool(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        if self.attn_pool is not None:
            x = self.norm(self.attn_pool(x))
            return self._global_pool(x)
        if self.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            return self.norm(pooled), tokens
        return self._global_pool(self.norm(x))

    def _global_pool(self, x: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        if self.pool_type == "avg":
            return x[:, 1:].mean(axis=1), x[:, 1:]
        if self.pool_type == "avg_all":
            return x.mean(axis=1), x[:, 1:]
        if self.pool_type == "tok":
            return x[:, 0], x[:, 1:]
        return x, x

    def forward(self, x: paddle.Tensor):
        x, keep = self.embed(x)
        x = self.transformer(x, rope=self.rope, rope_index=keep)
        pooled, tokens = self.pool(x)
        return _tower_output(pooled, tokens, self.head, self.output_tokens)


def _gather_rows(x: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """x [B, L, C], index [B] -> x[b, index[b]] as [B, C]."""
    B, _, C = x.shape
    idx = index.astype("int64").reshape([B, 1, 1]).expand([B, 1, C])
    return paddle.take_along_axis(x, idx, axis=1).squeeze(1)


class TextTransformer(nn.Layer):
    """Causal text transformer of CLIP.

    ``pool_type`` picks the pooled token: ``argmax`` (the EOT token, which has the largest
    id in the OpenAI vocabulary), ``eos`` (first ``eos_id``), ``first``, ``last``.
    ``embed_cls`` appends a learned class token (CoCa) that is always pooled and is
    normed after pooling; ``pad_id`` then masks padding keys.
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        mlp_ratio: float = 4.0,
        output_dim: Optional[int] = 512,
        ls_init_value: Optional[float] = None,
        embed_cls: bool = False,
        no_causal_mask: bool = False,
        use_pad_mask: bool = False,
        correct_cls_mask: bool = False,
        pad_id: int = 0,
        eos_id: int = 2,
        pool_type: str = "argmax",
        proj_type: str = "linear",
        proj_bias: bool = False,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
        use_fused_attn: bool = True,
        output_tokens: bool = False,
    ):
        super().__init__()
        if pool_type not in ("first", "last", "argmax", "eos", "none"):
            raise ValueError(f"text pool_type must be first/last/argmax/eos/none, got {pool_type!r}")
        self.context_length = context_length
        self.num_pos = context_length + (1 if embed_cls else 0)
        self.vocab_size = vocab_size
        self.width = width
        self.heads = heads
        self.output_dim = output_dim
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.pool_type = pool_type
        self.use_pad_mask = use_pad_mask and no_causal_mask
        self.correct_cls_mask = correct_cls_mask
        self.output_tokens = output_tokens

        self.token_embedding = nn.Embedding(vocab_size, width, weight_attr=_normal(0.02))
        self.cls_emb = self.create_parameter([width], attr=_normal(0.01)) if embed_cls else None
        self.positional_embedding = self.create_parameter([self.num_pos, width], attr=_normal(0.01))
        self.transformer = Transformer(
            width,
            layers,
            heads,
            mlp_ratio,
            ls_init_value=ls_init_value,
            act_layer=act_layer,
            norm_layer=norm_layer,
            use_fused_attn=use_fused_attn,
        )
        self.ln_final = norm_layer(width)
        if no_causal_mask:
            self.attn_mask = None
        else:
            mask = paddle.triu(paddle.full([self.num_pos, self.num_pos], float("-inf")), 1)
            self.register_buffer("attn_mask", mask, persistable=False)
        self.text_projection = _text_projection(width, output_dim, proj_type, proj_bias)
        self._init_blocks()

    def _init_blocks(self) -> None:
        """open_clip's text init: depth-scaled normal stds for the projections."""
        proj_std = (self.width**-0.5) * ((2 * self.transformer.layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for blk in self.transformer.blocks:
            nn.initializer.Normal(std=attn_std)(blk.attn.qkv.weight)
            nn.initializer.Normal(std=proj_std)(blk.attn.proj.weight)
            nn.initializer.Normal(std=fc_std)(blk.mlp.fc1.weight)
            nn.initializer.Normal(std=proj_std)(blk.mlp.fc2.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def lock(self, unlocked_layers: int = 0) -> None:
        """Freeze the tower, leaving the last ``unlocked_layers`` blocks (and the head) trainable."""
        for p in self.parameters():
            p.stop_gradient = True
        if unlocked_layers <= 0:
            return
        trainable: List = list(self.transformer.blocks)[-unlocked_layers:] + [self.ln_final]
        if self.text_projection is not None:
            trainable.append(self.text_projection)
        _unfreeze(trainable)

    def _mask(self, text: paddle.Tensor, seq_len: int, dtype) -> Optional[paddle.Tensor]:
        mask = None if self.attn_mask is None else self.attn_mask[:seq_len, :seq_len].astype(dtype)
        if self.use_pad_mask or self.cls_emb is not None:
            valid = text != self.pad_id
            if self.cls_emb is not None:
                ones = paddle.ones([text.shape[0], 1], dtype="bool")
                # open_clip's legacy CoCa mask marks the first key valid instead of the cls key.
                valid = paddle.concat([valid, ones] if self.correct_cls_mask else [ones, valid], axis=1)
            pad = paddle.where(valid, paddle.zeros([], dtype), paddle.full([], float("-inf"), dtype))
            pad = pad[:, None, None, :]  # [B, 1, 1, K], broadcast over heads and queries
            mask = pad if mask is None else mask[None, None] + pad
        return mask

    def forward(self, text: paddle.Tensor):
        B, L = text.shape
        x = self.token_embedding(text)
        seq_len = L
        if self.cls_emb is not None:
            x = paddle.concat([x, self.cls_emb.astype(x.dtype).reshape([1, 1, -1]).expand([B, 1, self.width])], 1)
            seq_len += 1
        x = x + self.positional_embedding[:seq_len].astype(x.dtype)
        x = self.transformer(x, attn_mask=self._mask(text, seq_len, x.dtype))
        if self.cls_emb is not None:
            pooled, tokens = self.ln_final(x[:, -1]), x[:, :-1]
        else:
            x = self.ln_final(x)
            pooled, tokens = self._pool(x, text), x
        return _tower_output(pooled, tokens, self.text_projection, self.output_tokens)

    def _pool(self, x: paddle.Tensor, text: paddle.Tensor) -> paddle.Tensor:
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "argmax":
            return _gather_rows(x, text.argmax(axis=-1))
        if self.pool_type == "eos":
            return _gather_rows(x, (text == self.eos_id).astype("int32").argmax(axis=-1))
        return x
