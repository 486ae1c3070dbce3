"""Building blocks shared by every tower (CLIP, EVA-CLIP, CLIPA).

Each concept is defined once here and switched by constructor arguments, so a
vision tower for OpenAI CLIP and one for EVA02 differ only in their config.
Tensors are batch-first ``[B, L, C]`` everywhere; attention heads are laid out
``[B, L, H, D]``, which is what Paddle's fused attention expects, so no
transposes are needed on the fast path.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Optional

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..kernels import dispatch

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
    "ATTENTION_FUNCTIONS",
    "AttentionalPooler",
    "sincos_2d_pos_embed",
]


class Linear(nn.Linear):
    """``nn.Linear`` whose implementation :func:`paddlemix.kernels.dispatch.linear` chooses.

    Same parameters and state-dict keys as ``nn.Linear``; on CPUs the bias goes inside the GEMM.
    ``packed`` is the weight's GEMM-layout copy while :func:`paddlemix.inference_mode` holds one
    for this layer (not state: it is never saved), None otherwise.
    """

    packed: Optional[dispatch.PackedWeight] = None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return dispatch.linear(x, self.weight, self.bias, packed=self.packed)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are float32 whatever the activation dtype.

    Low-precision statistics are the usual source of fp16/bf16 divergence, so fp16/bf16
    inputs are normalised in float32 and cast back. Which kernel normalises is
    :func:`paddlemix.kernels.dispatch.layer_norm`'s choice; it depends on training mode
    (see :mod:`paddlemix.kernels.dispatch`), so the layer passes it.
    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        dtype = x.dtype
        if dtype in (paddle.float16, paddle.bfloat16):
            w = None if self.weight is None else self.weight.astype("float32")
            b = None if self.bias is None else self.bias.astype("float32")
            y = F.layer_norm(x.astype("float32"), self._normalized_shape, w, b, self._epsilon)
            return y.astype(dtype)
        return dispatch.layer_norm(x, self._normalized_shape, self.weight, self.bias, self._epsilon, self.training)


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
    """Exact (erf) GELU, by the kernel :func:`paddlemix.kernels.dispatch.gelu` chooses."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return dispatch.gelu(x)


def softmax_last_axis(x: paddle.Tensor) -> paddle.Tensor:
    """``F.softmax(x, axis=-1)``, by the kernel :func:`paddlemix.kernels.dispatch.softmax` chooses."""
    return dispatch.softmax(x)


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

    def forward(self, x: paddle.Tensor, residual: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        """``fc2(act(fc1(x)))``, plus ``residual`` when given (the block's skip connection)."""
        if type(self.fc1) is Linear and type(self.act) is GELU:  # one kernel choice for both (not a tensor-parallel fc1)
            x = dispatch.linear_gelu(x, self.fc1.weight, self.fc1.bias, packed=self.fc1.packed)
        else:
            x = self.act(self.fc1(x))
        return _output_projection(self.fc2, self.drop, self.drop(self.norm(x)), residual)


def _output_projection(
    proj: nn.Layer, drop: nn.Layer, x: paddle.Tensor, residual: Optional[paddle.Tensor]
) -> paddle.Tensor:
    """``drop(proj(x))``, plus ``residual`` when given: a branch's last linear layer and the skip add.

    With a plain :class:`Linear` and no dropout, the kernel dispatch may add the bias and the
    residual in one pass (``linear_residual``); a tensor-parallel projection runs its own forward.
    """
    if residual is None:
        return drop(proj(x))
    if type(proj) is Linear and type(drop) is nn.Identity and proj.bias is not None:
        return dispatch.linear_residual(x, proj.weight, proj.bias, residual, packed=proj.packed)
    return residual + drop(proj(x))


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

    def forward(self, x: paddle.Tensor, residual: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        """``fc2(silu(x W_g) * (x W_x))``, plus ``residual`` when given (the block's skip connection)."""
        gate, value = paddle.split(self.fc1(x), 2, axis=-1)
        return _output_projection(self.fc2, self.drop, self.drop(self.norm(F.silu(gate) * value)), residual)


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
        attn_impl: Optional[str] = None,
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
        if attn_impl is not None and attn_impl not in dispatch.IMPLEMENTATIONS["attention"]:
            raise ValueError(
                f"attn_impl must be one of {list(dispatch.IMPLEMENTATIONS['attention'])} or None, got {attn_impl!r}"
            )
        self.attn_impl = attn_impl
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
            if type(self.qkv) is Linear and dispatch.choose("linear", x) == "addmm":  # the bias inside the GEMM
                return dispatch.linear(x, self.qkv.weight, bias, packed=self.qkv.packed)
            return self.qkv(x) + bias
        return self.qkv(x)

    def forward(
        self,
        x: paddle.Tensor,
        attn_mask: Optional[paddle.Tensor] = None,
        rope: Optional["RotaryEmbedding2D"] = None,  # noqa: F821
        rope_index: Optional[paddle.Tensor] = None,
        num_prefix_tokens: int = 1,
        residual: Optional[paddle.Tensor] = None,
    ) -> paddle.Tensor:
        """Self-attention of ``x``, plus ``residual`` when given (the block's skip connection)."""
        B, L, _ = x.shape
        shape = [B, L, 3, self.num_heads, self.head_dim]
        grad = paddle.is_grad_enabled() and not (x.stop_gradient and all(p.stop_gradient for p in self.parameters()))
        impl = dispatch.choose("attention", x, impl=self.attn_impl, fused_attn=self.use_fused_attn, grad=grad)
        dropout = self.attn_drop if self.training else 0.0
        if impl == "paddlemix" and type(self.qkv) is Linear and self.qkv_bias_mode == "qkv":
            # The head split adds the projection's bias in its pass (not a tensor-parallel qkv layer).
            qkv = dispatch.linear(x, self.qkv.weight, None, packed=self.qkv.packed).reshape(shape)
            x = cpu_split_attention(
                qkv, attn_mask, rope, rope_index, num_prefix_tokens, self.scale, dropout, self.training, self.qkv.bias
            )
        else:
            x = ATTENTION_FUNCTIONS[impl](
                self._qkv(x).reshape(shape), attn_mask, rope, rope_index, num_prefix_tokens, self.scale, dropout,
                self.training,
            )
        # Heads x head width, not C: under tensor parallelism this rank holds only some heads.
        x = self.norm(x.reshape([B, L, self.num_heads * self.head_dim]))
        return _output_projection(self.proj, self.proj_drop, x, residual)


def _split_heads(qkv, rope, rope_index, num_prefix_tokens: int):
    """``qkv`` [B, L, 3, H, D] -> q, k, v each [B, L, H, D], q and k rotated by ``rope``."""
    q, k, v = qkv.unbind(axis=2)
    if rope is not None:
        q = rope.rotate(q, rope_index, num_prefix_tokens)
        k = rope.rotate(k, rope_index, num_prefix_tokens)
    return q, k, v


def sdpa_attention(
    qkv, attn_mask, rope, rope_index, num_prefix_tokens: int, scale: float, dropout: float, training: bool
):
    """Paddle's ``scaled_dot_product_attention`` (flash attention on GPUs), [B, L, H, D] out."""
    q, k, v = _split_heads(qkv, rope, rope_index, num_prefix_tokens)
    if attn_mask is not None and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.astype(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, training=training)


def math_attention(
    qkv, attn_mask, rope, rope_index, num_prefix_tokens: int, scale: float, dropout: float, training: bool
):
    """:func:`attention_reference` (softmax in float32), [B, L, H, D] out."""
    q, k, v = _split_heads(qkv, rope, rope_index, num_prefix_tokens)
    if attn_mask is not None and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.astype(q.dtype)
    return attention_reference(q, k, v, attn_mask, scale, dropout, training)


def cpu_einsum_attention(
    qkv, attn_mask, rope, rope_index, num_prefix_tokens: int, scale: float, dropout: float, training: bool
):
    """Attention for float32 on a CPU, ``qkv`` [B, L, 3, H, D] -> [B, L, H, D].

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
    return _attend_heads(q * scale, k, v, attn_mask, dropout)


def cpu_split_attention(
    qkv,
    attn_mask,
    rope,
    rope_index,
    num_prefix_tokens: int,
    scale: float,
    dropout: float,
    training: bool,
    qkv_bias: Optional[paddle.Tensor] = None,
):
    """:func:`cpu_einsum_attention` with its layout change, head split and q scaling done in one
    multi-threaded pass by the kernel library's ``cpu_split_heads`` (no gradient: inference).
    Without RoPE or attention dropout, and with at most an [L, L] mask, the library's
    ``cpu_attention`` does the whole core per head where the library has it.

    ``qkv_bias``: the qkv projection's bias, not yet added to ``qkv``; the operator adds it in the
    same pass. The same bits: a GEMM's output plus the bias rounds as ``addmm`` does, k and v are
    copied, and q is multiplied by the same float32 scale (with RoPE, after its rotation, as there).
    """
    L = qkv.shape[1]
    fits = rope is None and dropout == 0 and (attn_mask is None or attn_mask.shape == [L, L])
    if dispatch.choose("attention_core", qkv, core_fits=fits) == "paddlemix":
        mask = None if attn_mask is None else attn_mask.astype(qkv.dtype)
        return dispatch.run_cpu_attention(qkv, qkv_bias, mask, scale)
    if rope is not None and not (rope_index is None and _rope_fits(rope, L - num_prefix_tokens)):
        if qkv_bias is not None:
            qkv = qkv + qkv_bias.reshape(qkv.shape[2:])
        return cpu_einsum_attention(qkv, attn_mask, rope, rope_index, num_prefix_tokens, scale, dropout, training)
    q, k, v = dispatch.run_cpu_split_heads(qkv, 1.0 if rope is not None else scale, qkv_bias)
    if rope is not None:
        q, k = _rotate_all_tokens(rope, q, k, num_prefix_tokens)
        q = q * scale
    return _attend_heads(q, k, v, attn_mask, dropout)


def _attend_heads(q, k, v, attn_mask, dropout: float) -> paddle.Tensor:
    """Scaled q, k, v [B, H, L, D] -> softmax(q k^T + mask) v as [B, L, H, D]."""
    attn = paddle.matmul(q, k, transpose_y=True)
    if attn_mask is not None:
        attn = attn + attn_mask.astype(attn.dtype)
    attn = softmax_last_axis(attn)
    if dropout > 0:
        attn = F.dropout(attn, dropout, training=True, mode="upscale_in_train")
    return paddle.einsum("bhld->blhd", paddle.matmul(attn, v))


# The attention implementations by the names :func:`paddlemix.kernels.dispatch.choose` returns.
ATTENTION_FUNCTIONS: Dict[str, Callable[..., paddle.Tensor]] = {
    "paddlemix": cpu_split_attention,
    "cpu_einsum": cpu_einsum_attention,
    "sdpa": sdpa_attention,
    "math": math_attention,
}


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

