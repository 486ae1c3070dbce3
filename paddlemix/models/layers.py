"""Building blocks shared by every tower (CLIP, EVA-CLIP, CLIPA).

Each concept is defined once here and switched by constructor arguments, so a
vision tower for OpenAI CLIP and one for EVA02 differ only in their config.
Tensors are batch-first ``[B, L, C]`` everywhere; attention heads are laid out
``[B, L, H, D]``, which is what Paddle's fused attention expects, so no
transposes are needed on the fast path.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

__all__ = [
    "Linear",
    "LayerNorm",
    "RMSNorm",
    "GELU",
    "QuickGELU",
    "softmax_last_axis",
    "get_act_layer",
    "get_norm_layer",
    "LayerScale",
    "DropPath",
    "PatchDropout",
    "Mlp",
    "SwiGLU",
    "Attention",
    "AttentionalPooler",
    "sincos_2d_pos_embed",
]


def _cpu_eager_fp32(x: paddle.Tensor) -> bool:
    """True where the CPU fast paths below apply: dynamic graph, a float32 tensor on the CPU.

    Static graphs (export) keep the plain ops, which the inference passes fuse themselves.
    """
    return paddle.in_dynamic_mode() and x.dtype == paddle.float32 and x.place.is_cpu_place()


def _cpu_fp32(x: paddle.Tensor) -> bool:
    """A float32 tensor on the CPU, or a static graph being built on a CPU (an export there).

    The attention formulation below is the faster one for Paddle Inference on CPUs as well
    (oneDNN runs RoPE's broadcast multiplies of [N, 1, D] tables on a slow path); a graph
    built on a GPU keeps scaled_dot_product_attention, i.e. flash attention.
    """
    if x.dtype != paddle.float32:
        return False
    if paddle.in_dynamic_mode():
        return x.place.is_cpu_place()
    return paddle.framework._current_expected_place_().is_cpu_place()


class _AddmmLinear(PyLayer):
    """``x @ w + b`` for 2-D ``x`` with a backward of three BLAS calls.

    Paddle's own ``addmm`` backward reduces the bias gradient with a column ``sum`` that runs
    at a fraction of memory speed on CPUs, while the same sum as ``ones @ dy`` is one BLAS call.
    Same numbers: the gradients are bit-identical to ``addmm``'s (tested).
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        return paddle.addmm(bias, x, weight)

    @staticmethod
    def backward(ctx, dy: paddle.Tensor):
        x, weight = ctx.saved_tensor()
        need_x, need_w, need_b = ctx.needs
        dx = paddle.matmul(dy, weight, transpose_y=True) if need_x else None
        dw = paddle.matmul(x, dy, transpose_x=True) if need_w else None
        db = paddle.matmul(paddle.ones([1, dy.shape[0]], dy.dtype), dy).reshape([-1]) if need_b else None
        return dx, dw, db


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU forward adds the bias inside the GEMM (``addmm``).

    Paddle's CPU ``linear`` is a matmul followed by a separate broadcast add, which writes
    and re-reads the whole output; ``addmm`` hands the bias to the BLAS call instead, and :class:`_AddmmLinear` gives it a faster
    backward. Same parameters and state-dict keys as ``nn.Linear``.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.bias is None or not _cpu_fp32(x) or self.weight.dtype != paddle.float32:
            return F.linear(x, self.weight, self.bias)
        return addmm_linear(x, self.weight, self.bias)


def addmm_linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """``F.linear(x, weight, bias)`` on the CPU fast path (float32 ``x`` of any rank).

    Also used when a static graph is built on a CPU (an export): Paddle Inference then runs
    the same ``addmm`` kernel as dynamic mode, which measured faster here than what its own
    passes make of ``matmul`` + ``add`` (README, Performance).
    """
    shape = x.shape
    x2 = x.reshape([-1, shape[-1]])
    if not paddle.in_dynamic_mode():
        y = paddle.addmm(bias, x2, weight)
        return y.reshape([-1 if d is None or d < 0 else d for d in shape[:-1]] + [weight.shape[-1]])
    if paddle.is_grad_enabled() and not (x.stop_gradient and weight.stop_gradient and bias.stop_gradient):
        y = _AddmmLinear.apply(x2, weight, bias)
    else:
        y = paddle.addmm(bias, x2, weight)
    return y.reshape(shape[:-1] + [y.shape[-1]])


def _cpu_kernels():
    """The module running paddlemix's CPU kernels when their library is loaded, else None.

    Paddle's CPU kernels for three element-wise steps of a ViT block run far below memory
    speed in float32: ``layer_norm`` backward, ``gelu`` forward + backward and the attention
    ``softmax`` (measurements in ``benchmarks/`` and the README). The operators compute the same math (to float32
    rounding; the GELU tail is more accurate than Paddle's), so the layers below use them for
    float32 CPU tensors in dynamic mode. :mod:`paddlemix.kernels` decides: it only loads a
    library built ahead of time and never compiles, so without one Paddle's kernels stay
    (after one warning). Static graphs (export) always use Paddle's ops.
    """
    from .. import kernels

    if not kernels.available():
        return None
    from . import fused_norm

    return fused_norm


class LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in float32 and casts back.

    Low-precision statistics are the usual source of fp16/bf16 divergence, so the
    reduction always runs in fp32 whatever the activation dtype. In training mode on a CPU,
    float32 goes through the fused_ln operator (see :func:`_cpu_kernels`), whose backward is
    the fast part; its forward alone is slower than Paddle's, so evaluation keeps Paddle's
    kernel, and training mode (not "grad enabled") decides so that recompute's no-grad first
    pass matches its replay.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        dtype = x.dtype
        if dtype in (paddle.float16, paddle.bfloat16):
            w = None if self.weight is None else self.weight.astype("float32")
            b = None if self.bias is None else self.bias.astype("float32")
            y = F.layer_norm(x.astype("float32"), self._normalized_shape, w, b, self._epsilon)
            return y.astype(dtype)
        if (
            self.weight is not None
            and self.bias is not None
            and self.training
            and _cpu_eager_fp32(x)
        ):
            ops = _cpu_kernels()
            if ops is not None:
                return ops.fused_ln(x, None, self.weight, self.bias, self._epsilon)[0]
        return F.layer_norm(x, self._normalized_shape, self.weight, self.bias, self._epsilon)


class RMSNorm(nn.Layer):
    """Root-mean-square norm (EVA-CLIP-18B), statistics in float32."""

    def __init__(self, dim: int, epsilon: float = 1e-6):
        super().__init__()
        self.epsilon = epsilon
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        dtype = x.dtype
        xf = x.astype("float32")
        y = xf * paddle.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.epsilon)
        return (y * self.weight.astype("float32")).astype(dtype)


class QuickGELU(nn.Layer):
    """The sigmoid GELU approximation OpenAI trained with; weights trained with it need it."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * F.sigmoid(1.702 * x)


class GELU(nn.Layer):
    """Exact (erf) GELU; float32 on the CPU in dynamic mode runs the external_ops kernel."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if _cpu_eager_fp32(x):
            ops = _cpu_kernels()
            if ops is not None:
                return ops.cpu_gelu(x)
        return F.gelu(x)


def softmax_last_axis(x: paddle.Tensor) -> paddle.Tensor:
    """``F.softmax(x, axis=-1)``; float32 on the CPU in dynamic mode runs the external_ops kernel."""
    if _cpu_eager_fp32(x):
        ops = _cpu_kernels()
        if ops is not None:
            return ops.cpu_softmax(x)
    return F.softmax(x, axis=-1)


def get_act_layer(quick_gelu: bool) -> Callable[[], nn.Layer]:
    return QuickGELU if quick_gelu else GELU


def get_norm_layer(use_rms_norm: bool = False, eps: float = 1e-5, fused: bool = False) -> Callable[[int], nn.Layer]:
    """Norm factory; ``fused`` selects the fused LayerNorm custom op when it is built."""
    if fused:
        from .fused_norm import fused_norm_layer

        return fused_norm_layer(use_rms_norm=use_rms_norm, eps=eps)
    if use_rms_norm:
        return lambda dim: RMSNorm(dim, epsilon=eps)
    return lambda dim: LayerNorm(dim, epsilon=eps)


class LayerScale(nn.Layer):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = self.create_parameter([dim], default_initializer=nn.initializer.Constant(init_values))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * self.gamma


class DropPath(nn.Layer):
    """Stochastic depth per sample (residual branch dropped for the whole sample)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = [x.shape[0]] + [1] * (x.ndim - 1)
        mask = paddle.bernoulli(paddle.full(shape, keep, dtype=x.dtype))
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class PatchDropout(nn.Layer):
    """Keeps a random subset of patch tokens during training (FLIP, arXiv:2212.00794).

    Returns the kept token indices too, so position-dependent layers after it
    (2-D RoPE in EVA) can gather the matching positions: the indices travel as an
    explicit value instead of hidden module state.
    """

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: paddle.Tensor):
        if not self.training or self.prob == 0.0:
            return x, None
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        batch, num_tokens = patches.shape[0], patches.shape[1]
        num_keep = max(1, int(num_tokens * (1.0 - self.prob)))
        keep = paddle.topk(paddle.randn([batch, num_tokens]), num_keep, axis=-1)[1]
        patches = _gather_tokens(patches, keep)
        return paddle.concat([prefix, patches], axis=1), keep

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


def _gather_tokens(x: paddle.Tensor, index: paddle.Tensor) -> paddle.Tensor:
    """x [B, N, C], index [B, K] -> [B, K, C]."""
    index = index.unsqueeze(-1).expand([index.shape[0], index.shape[1], x.shape[-1]])
    return paddle.take_along_axis(x, index, axis=1)


class Mlp(nn.Layer):
    """Two-layer MLP; ``norm_layer`` adds the sub-LN of EVA's ``subln`` before fc2."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act_layer: Callable[[], nn.Layer] = GELU,
        norm_layer: Optional[Callable[[int], nn.Layer]] = None,
        drop: float = 0.0,
    ):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = act_layer()
        self.norm = norm_layer(hidden_dim) if norm_layer is not None else nn.Identity()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.act(self.fc1(x))
        x = self.drop(self.norm(x))
        return self.drop(self.fc2(x))


class SwiGLU(nn.Layer):
    """SwiGLU MLP (EVA02 ``naiveswiglu``): silu(x W_g) * (x W_x), then W_o.

    Gate and value projections share one matmul (``fc1`` holds [W_g | W_x]),
    which is one GEMM instead of two on every call.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        norm_layer: Optional[Callable[[int], nn.Layer]] = None,
        drop: float = 0.0,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.fc1 = Linear(dim, 2 * hidden_dim)
        self.norm = norm_layer(hidden_dim) if norm_layer is not None else nn.Identity()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        gate, value = paddle.split(self.fc1(x), 2, axis=-1)
        x = self.drop(self.norm(F.silu(gate) * value))
        return self.drop(self.fc2(x))


class Attention(nn.Layer):
    """Multi-head self-attention with a fused qkv projection.

    ``qkv_bias`` is ``"qkv"`` (a bias on all three, CLIP), ``"qv"`` (BEiT/EVA: q and v
    biases, k bias fixed at zero so it is not a parameter) or ``"none"``.
    ``inner_norm`` is EVA's ``subln`` norm before the output projection.
    ``rope`` (given per call) rotates q and k of the tokens after ``num_prefix_tokens``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: str = "qkv",
        inner_norm: Optional[Callable[[int], nn.Layer]] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        use_fused_attn: bool = True,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
        if qkv_bias not in ("qkv", "qv", "none"):
            raise ValueError(f"qkv_bias must be 'qkv', 'qv' or 'none', got {qkv_bias!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_bias_mode = qkv_bias
        self.use_fused_attn = use_fused_attn
        self.qkv = Linear(dim, 3 * dim, bias_attr=None if qkv_bias == "qkv" else False)
        if qkv_bias == "qv":
            zeros = nn.initializer.Constant(0.0)
            self.q_bias = self.create_parameter([dim], default_initializer=zeros, is_bias=True)
            self.v_bias = self.create_parameter([dim], default_initializer=zeros, is_bias=True)
        self.norm = inner_norm(dim) if inner_norm is not None else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def _qkv(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.qkv_bias_mode == "qv":
            # Through ``self.qkv`` (not F.linear on its weight) so a tensor-parallel qkv layer
            # still runs its own forward (F.linear with a bias is the same matmul and add).
            bias = paddle.concat([self.q_bias, paddle.zeros_like(self.q_bias), self.v_bias])
            if type(self.qkv) is Linear and _cpu_fp32(x):  # the bias inside the GEMM
                return addmm_linear(x, self.qkv.weight, bias)
            return self.qkv(x) + bias
        return self.qkv(x)

    def forward(
        self,
        x: paddle.Tensor,
        attn_mask: Optional[paddle.Tensor] = None,
        rope: Optional["RotaryEmbedding2D"] = None,  # noqa: F821
        rope_index: Optional[paddle.Tensor] = None,
        num_prefix_tokens: int = 1,
    ) -> paddle.Tensor:
        B, L, _ = x.shape
        qkv = self._qkv(x).reshape([B, L, 3, self.num_heads, self.head_dim])
        if self.use_fused_attn and _cpu_fp32(qkv):
            x = self._attend_cpu(qkv, attn_mask, rope, rope_index, num_prefix_tokens)
            return self.proj_drop(self.proj(self.norm(x.reshape([B, L, self.num_heads * self.head_dim]))))
        q, k, v = qkv.unbind(axis=2)  # each [B, L, H, D]
        if rope is not None:
            q = rope.rotate(q, rope_index, num_prefix_tokens)
            k = rope.rotate(k, rope_index, num_prefix_tokens)
        x = self._attend(q, k, v, attn_mask)
        # Heads x head width, not C: under tensor parallelism this rank holds only some heads.
        x = self.norm(x.reshape([B, L, self.num_heads * self.head_dim]))
        return self.proj_drop(self.proj(x))

    def _attend_cpu(self, qkv, attn_mask, rope, rope_index, num_prefix_tokens: int) -> paddle.Tensor:
        """Attention on the CPU, ``qkv`` [B, L, 3, H, D] -> [B, L, H, D].

        The math of ``scaled_dot_product_attention``'s CPU (math) backend, with the same
        results, but with every layout change done by ``einsum``, which writes a contiguous
        copy: the strided views the SDPA path makes (unbind, transpose) are each copied again
        by Paddle's generic strided-copy kernel inside the next op, which is much slower than the
        transpose kernel einsum uses and dominated the attention time.
        """
        if rope is None or (rope_index is None and _rope_fits(rope, qkv.shape[1] - num_prefix_tokens)):
            qkv = paddle.einsum("blthd->tbhld", qkv)  # [3, B, H, L, D]
            q, k, v = qkv.unbind(0)  # not qkv[i]: each slice's backward writes a full-size zero tensor
            if rope is not None:
                q, k = _rotate_all_tokens(rope, q, k, num_prefix_tokens)
        else:
            q, k, v = paddle.einsum("blthd->tblhd", qkv).unbind(0)  # RoPE rotates along the token axis 1
            q = rope.rotate(q, rope_index, num_prefix_tokens)
            k = rope.rotate(k, rope_index, num_prefix_tokens)
            q, k, v = (paddle.einsum("blhd->bhld", t) for t in (q, k, v))
        attn = paddle.matmul(q * self.scale, k, transpose_y=True)
        if attn_mask is not None:
            attn = attn + attn_mask.astype(attn.dtype)
        attn = softmax_last_axis(attn)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop, training=True, mode="upscale_in_train")
        return paddle.einsum("bhld->blhd", paddle.matmul(attn, v))

    def _attend(self, q, k, v, attn_mask):
        dropout = self.attn_drop if self.training else 0.0
        if attn_mask is not None and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.astype(q.dtype)
        if self.use_fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, training=self.training)
        return attention_reference(q, k, v, attn_mask, self.scale, dropout, self.training)


@functools.lru_cache(maxsize=None)
def _pair_rotation(dim: int) -> np.ndarray:
    """[dim, dim] signed permutation R with x @ R = (-x1, x0, -x3, x2, ...)."""
    table = np.zeros([dim, dim], dtype=np.float32)
    table[np.arange(1, dim, 2), np.arange(0, dim, 2)] = -1.0  # out[2i] = -x[2i+1]
    table[np.arange(0, dim, 2), np.arange(1, dim, 2)] = 1.0  # out[2i+1] = x[2i]
    return table


def _rope_fits(rope, num_patches: int) -> bool:
    return rope.freqs_cos.shape[0] == num_patches and rope.freqs_cos.dtype == paddle.float32


def _rotate_all_tokens(rope, q: paddle.Tensor, k: paddle.Tensor, num_prefix_tokens: int):
    """``rope.rotate`` of q and k in the [B, H, L, D] layout, without slicing out the patches.

    Prefix tokens get cos 1 and sin 0, which leaves them exactly as they were, and the pair
    rotation (x0, x1, ...) -> (-x1, x0, ...) is a matmul with a signed permutation matrix (each
    output one product with +-1 plus exact zeros), so the result equals ``rope.rotate`` bit for
    bit while every op runs on contiguous memory: the strided patch slices and the stack in
    ``rope.rotate`` were a large share of an EVA02 forward on the CPU.
    """
    dim = q.shape[-1]
    rotation = paddle.to_tensor(_pair_rotation(dim))
    cos = paddle.concat([paddle.ones([num_prefix_tokens, dim], "float32"), rope.freqs_cos])  # [L, D]
    sin = paddle.concat([paddle.zeros([num_prefix_tokens, dim], "float32"), rope.freqs_sin])
    return tuple(t * cos + paddle.matmul(t, rotation) * sin for t in (q, k))


def attention_reference(q, k, v, attn_mask=None, scale=None, dropout: float = 0.0, training: bool = False):
    """Plain softmax attention on [B, L, H, D] inputs; the exact fallback of the fused op."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q.transpose([0, 2, 1, 3])
    k = k.transpose([0, 2, 1, 3])
    v = v.transpose([0, 2, 1, 3])
    attn = paddle.matmul(q * scale, k, transpose_y=True)
    if attn_mask is not None:
        attn = attn + attn_mask
    attn = F.softmax(attn.astype("float32"), axis=-1).astype(q.dtype)
    if dropout > 0:
        attn = F.dropout(attn, dropout, training=training)
    return paddle.matmul(attn, v).transpose([0, 2, 1, 3])


class AttentionalPooler(nn.Layer):
    """Cross-attention from learned queries onto the tokens (CoCa-style pooler).

    ``n_queries`` learned queries attend to LayerNorm-ed tokens; weights follow
    ``nn.MultiheadAttention`` semantics with separate q / kv input widths.
    """

    def __init__(
        self,
        d_model: int,
        context_dim: int,
        n_head: int = 8,
        n_queries: int = 256,
        norm_layer: Callable[[int], nn.Layer] = LayerNorm,
    ):
        super().__init__()
        if d_model % n_head != 0:
            raise ValueError(f"attentional pooler width {d_model} is not divisible by its heads {n_head}")
        self.n_head = n_head
        self.query = self.create_parameter(
            [n_queries, d_model], default_initializer=nn.initializer.Normal(std=d_model**-0.5)
        )
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(context_dim, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.ln_q = norm_layer(d_model)
        self.ln_k = norm_layer(context_dim)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        B, L, _ = x.shape
        x = self.ln_k(x)
        q = self.q_proj(self.ln_q(self.query))  # [Q, D]
        nq, d = q.shape
        hd = d // self.n_head
        q = q.reshape([1, nq, self.n_head, hd]).expand([B, nq, self.n_head, hd])
        k, v = paddle.split(self.kv_proj(x), 2, axis=-1)
        k = k.reshape([B, L, self.n_head, hd])
        v = v.reshape([B, L, self.n_head, hd])
        out = attention_reference(q, k, v)
        return self.out_proj(out.reshape([B, nq, d]))


def sincos_2d_pos_embed(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sine-cosine position table (MAE convention: half the channels per axis).

    Row i of the grid is h = i // grid_size, w = i % grid_size; the first half of
    the channels encodes w, the second h, each as [sin | cos] over
    ``1 / 10000 ** (k / (dim / 4))``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos 2-D position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    hh, ww = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")

    def axis_embed(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([axis_embed(ww), axis_embed(hh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return emb.astype(np.float32)


def trunc_normal_(tensor: paddle.Tensor, std: float = 0.02) -> None:
    """In-place truncated normal init at +-2 std, as timm/EVA initialise linears."""
    values = np.clip(np.random.normal(0.0, std, size=tensor.shape), -2 * std, 2 * std)
    tensor.set_value(values.astype(tensor.numpy().dtype if tensor.dtype != paddle.bfloat16 else np.float32))
