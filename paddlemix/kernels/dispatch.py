"""The one place that decides *how* each step of a model is computed.

Layers in :mod:`paddlemix.models` say *what* they compute (a linear map, attention, GELU, a
LayerNorm, a softmax, the patch embedding) and call :func:`choose` for the implementation, the
way HF's CLIP picks an attention function from a registry and timm asks ``use_fused_attn()``.
:func:`choose` names one of :data:`IMPLEMENTATIONS` from a few facts only: the tensor's place,
its dtype, whether a dynamic or a static graph is running, whether the caller will take a
gradient through the call (the inference-only operators have no backward), and whether
paddlemix's kernel library is loaded (:func:`paddlemix.kernels.available`). A caller may name an implementation
explicitly (``impl=``); nothing is read from the environment.

The rules, and why:

- ``linear``: ``"addmm"`` for float32 on a CPU, in dynamic mode and in a static graph built on a
  CPU (an export there). Paddle's CPU ``linear`` is a GEMM followed by a separate broadcast add
  that writes and re-reads the output; ``addmm`` hands the bias to the BLAS call, and in dynamic
  mode :class:`_AddmmLinear` gives it a backward of three BLAS calls. Otherwise ``"paddle"``.
- ``attention``: ``"cpu_einsum"`` for float32 on a CPU (dynamic, or a static graph built on a
  CPU, where it is also the faster graph for Paddle Inference), and in dynamic mode without a
  gradient, when the library is loaded, ``"paddlemix"``: the same math with the head split and
  q scaling in one pass of the library's ``cpu_split_heads`` instead of Paddle's single-threaded
  ``einsum`` and ``scale``, and, where the library has ``cpu_attention`` (built against the MKL
  Paddle bundles) and the mask is absent or one [L, L] matrix (no RoPE), the whole core (head
  split, both GEMMs per head, mask, softmax, output in the projection's layout) in that one
  operator, with the bits of the separate steps (tested; that choice is ``attention_core`` below); ``"sdpa"``
  (``scaled_dot_product_attention``, flash attention on GPUs) elsewhere; ``"math"`` (the plain
  reference) when the layer was built with ``use_fused_attn=False``.
- ``attention_core`` (inside ``attention``'s ``"paddlemix"``): ``"paddlemix"`` (the library's
  ``cpu_attention``, the whole core per head) where the library has the operator and the call has
  no RoPE, no attention dropout and at most one [L, L] mask (``core_fits``); ``"split_heads"``
  (``cpu_split_heads``, then Paddle's batched GEMMs and the softmax operator) otherwise.
- ``gelu``, ``softmax``: ``"paddlemix"`` (the library's operators) for float32 CPU tensors in
  dynamic mode when the library is loaded; Paddle's kernels run far below memory speed there.
- ``layer_norm``: as ``gelu``, and only in training mode: the fused operator's backward is the
  fast part while its forward alone is slower than Paddle's. Training mode, not "grad enabled",
  decides, so that recompute's no-grad first pass matches its replay.
- ``linear_gelu`` (a linear layer followed by exact GELU, the MLP's first half): ``"paddlemix"``
  (the GEMM without its bias, then the library's ``cpu_bias_gelu`` adds the bias inside the GELU
  pass) for float32 CPU tensors in dynamic mode when the library is loaded and no gradient is
  taken; ``"separate"`` (``linear`` then ``gelu``) otherwise. A bias written into the GEMM's
  output costs a pass over the widest activation of the block; the GELU reads it anyway. The
  numbers are the same: MKL adds the output it is given after the product, so ``addmm`` and the
  GEMM followed by the bias add round identically (tested bit for bit).
- ``linear_residual`` (a block's last linear layer and the residual add after it, ``r + (x @ w + b)``):
  ``"paddlemix"`` (the GEMM without its bias, then the library's ``cpu_bias_residual`` adds the
  bias and the residual in one multi-threaded pass) under the same conditions as
  ``linear_gelu``; ``"separate"`` (``linear``, then Paddle's add) otherwise. The same two float32
  additions in the same order, so the same bits (tested).
- ``gemm`` (the product of an activation with a linear layer's weight, inside ``linear``,
  ``linear_gelu`` and ``linear_residual``): ``"packed"`` (the library's ``cpu_packed_gemm`` on a
  copy of the weight packed once into MKL's GEMM layout, see :class:`PackedWeight`) when the
  layer holds a :class:`PackedWeight` (inside :func:`paddlemix.inference_mode`), for float32 CPU
  tensors in dynamic mode, without a gradient, where the library has the operator; ``"paddle"``
  otherwise. Packing is opt-in because the packed copy doubles the weight's memory and cannot
  see a weight changed in place by Paddle's ``set_value``, ``set_state_dict`` or an optimizer
  (none of which marks the tensor as changed); it also rounds as MKL's packed kernels do, which
  can differ from the unpacked GEMM in the last bit for some shapes.
- ``patch_embed``: ``"matmul"`` (the stride-equals-kernel convolution as one GEMM over patches)
  for float32 input and weight on a CPU in dynamic mode, ``"conv"`` otherwise.
- ``fused_norm`` (the ``fusedLN`` layers of :mod:`paddlemix.models.fused_norm`, which decide at
  construction whether the library is required): ``"paddlemix"`` for the inputs the operator
  covers (float32/float16/bfloat16 on a CPU, or on a GPU with a CUDA Paddle and rows of at most
  8192), ``"reference"`` (the plain math) otherwise; that is a property of the input, not the build.

Every implementation computes the same numbers as Paddle's (bit for bit, or to float32 rounding
for the library's operators; tests hold both). Static graphs keep Paddle's element-wise ops,
which the inference passes fuse themselves.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from . import available, status

__all__ = [
    "IMPLEMENTATIONS", "addmm_linear", "choose", "gelu", "has_op", "layer_norm", "linear", "linear_gelu", "linear_residual",
    "PackedWeight", "softmax",
]

IMPLEMENTATIONS: Dict[str, Tuple[str, ...]] = {
    "linear": ("addmm", "paddle"),
    "attention": ("paddlemix", "cpu_einsum", "sdpa", "math"),
    "attention_core": ("paddlemix", "split_heads"),
    "gelu": ("paddlemix", "paddle"),
    "linear_gelu": ("paddlemix", "separate"),
    "linear_residual": ("paddlemix", "separate"),
    "layer_norm": ("paddlemix", "paddle"),
    "softmax": ("paddlemix", "paddle"),
    "gemm": ("packed", "paddle"),
    "patch_embed": ("matmul", "conv"),
    "fused_norm": ("paddlemix", "reference"),
}

_FUSED_NORM_DTYPES = (paddle.float32, paddle.float16, paddle.bfloat16)
_CUDA_MAX_COLS = 8192  # csrc fused_ln_cuda.cuh: kMaxCols


def _on_cpu(x: paddle.Tensor) -> bool:
    """The tensor is on a CPU; in a static graph, the graph is being built for a CPU."""
    if paddle.in_dynamic_mode():
        return x.place.is_cpu_place()
    return paddle.framework._current_expected_place_().is_cpu_place()


def _eager_cpu_fp32(x: paddle.Tensor) -> bool:
    return paddle.in_dynamic_mode() and x.dtype == paddle.float32 and x.place.is_cpu_place()


def _fused_norm_handles(x: paddle.Tensor) -> bool:
    if x.dtype not in _FUSED_NORM_DTYPES or x.ndim == 0:
        return False
    place = x.place
    if place.is_cpu_place():
        return True
    return place.is_gpu_place() and paddle.is_compiled_with_cuda() and x.shape[-1] <= _CUDA_MAX_COLS


def choose(
    op: str,
    x: paddle.Tensor,
    *,
    impl: Optional[str] = None,
    params_fp32: bool = True,
    training: bool = False,
    fused_attn: bool = True,
    grad: bool = False,
    packed: bool = False,
    core_fits: bool = False,
) -> str:
    """The implementation of ``op`` (a key of :data:`IMPLEMENTATIONS`) for input ``x``.

    ``params_fp32``: the layer's parameters are float32 (and present where the fast path needs
    them); ``training``: the layer is in training mode; ``fused_attn``: the attention layer may
    use a fused formulation; ``grad``: a gradient will be taken through the call; ``packed``: the layer holds a
    :class:`PackedWeight`; ``core_fits``: the attention call has no RoPE, no dropout and at most an
    [L, L] mask. ``impl`` names the implementation instead of choosing one.
    """
    choices = IMPLEMENTATIONS.get(op)
    if choices is None:
        raise ValueError(f"unknown operation {op!r}; expected one of {sorted(IMPLEMENTATIONS)}")
    if impl is not None:
        if impl not in choices:
            raise ValueError(f"unknown {op} implementation {impl!r}; expected one of {list(choices)}")
        if impl == "paddlemix" and not status().available:
            raise ValueError(
                f"{op} implementation 'paddlemix' needs the kernel library ({status().detail}); "
                "build it with `python -m paddlemix.kernels build` or pass impl=None"
            )
        return impl
    if op == "linear":
        return "addmm" if params_fp32 and x.dtype == paddle.float32 and _on_cpu(x) else "paddle"
    if op == "attention":
        if not fused_attn:
            return "math"
        if x.dtype == paddle.float32 and _on_cpu(x):
            return "paddlemix" if not grad and paddle.in_dynamic_mode() and available() else "cpu_einsum"
        return "sdpa"
    if op in ("linear_gelu", "linear_residual"):
        return "paddlemix" if params_fp32 and not grad and _eager_cpu_fp32(x) and available() else "separate"
    if op == "attention_core":
        return "paddlemix" if core_fits and has_op("cpu_attention") else "split_heads"
    if op == "gemm":
        usable = packed and params_fp32 and not grad and _eager_cpu_fp32(x) and has_op("cpu_packed_gemm")
        return "packed" if usable else "paddle"
    if op == "patch_embed":
        return "matmul" if params_fp32 and _eager_cpu_fp32(x) else "conv"
    if op == "fused_norm":  # the layer decided at construction that the library is used
        return "paddlemix" if _fused_norm_handles(x) else "reference"
    if op == "layer_norm" and not (training and params_fp32):
        return "paddle"
    # gelu, softmax, layer_norm: the library's operators, when it is loaded (else one warning)
    return "paddlemix" if _eager_cpu_fp32(x) and available() else "paddle"


# ----------------------------------------------------------------------------- implementations


def _run_custom_op(name: str, *args):
    return paddle._C_ops._run_custom_op(name, *args)


def run_fused_ln(x, residual, weight, bias, epsilon: float, rms_norm: bool, portable: bool = False):
    """The library's ``fused_ln`` operator: ``(y, residual_out, mean, rstd)``; the caller checked it is loaded."""
    return tuple(_run_custom_op("fused_ln", x, residual, weight, bias, float(epsilon), bool(rms_norm), bool(portable)))


def run_cpu_gelu(x: paddle.Tensor) -> paddle.Tensor:
    """The library's exact-GELU operator (float32 CPU tensors, differentiable)."""
    return _run_custom_op("cpu_gelu", x)[0]


def run_cpu_split_heads(qkv: paddle.Tensor, scale: float, bias: Optional[paddle.Tensor] = None):
    """The library's ``qkv`` [B, L, 3, H, D] (+ ``bias`` [3 H D]) -> ``(q * scale, k, v)`` [B, H, L, D]
    operator (float32 CPU; no gradient)."""
    with_bias = bias is not None
    if not with_bias:
        bias = paddle.empty([0], dtype=qkv.dtype)
    return tuple(_run_custom_op("cpu_split_heads", qkv, bias, float(scale), with_bias))


def has_op(name: str) -> bool:
    """Whether the loaded kernel library has operator ``name`` (some need a dependency, see
    :class:`paddlemix.kernels.KernelStatus`)."""
    current = status()
    return current.available and name in current.ops


def run_cpu_attention(
    qkv: paddle.Tensor, bias: Optional[paddle.Tensor], mask: Optional[paddle.Tensor], scale: float
) -> paddle.Tensor:
    """The library's attention core: ``qkv`` [B, L, 3, H, D] (+ ``bias`` [3 H D], + an additive
    ``mask`` [L, L]) -> ``softmax(q k^T * scale + mask) v`` as [B, L, H, D] (float32 CPU; no gradient)."""
    B, L, _, H, D = qkv.shape
    empty = paddle.empty([0], dtype=qkv.dtype)
    with_bias, with_mask = bias is not None, mask is not None
    out = _run_custom_op(
        "cpu_attention", qkv, bias if with_bias else empty, mask if with_mask else empty, float(scale), with_bias,
        with_mask,
    )[0]
    return out.reshape([B, L, H, D])


def run_cpu_bias_gelu(x: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """The library's ``GELU(x + bias)`` operator, written over ``x`` and returned (float32 CPU tensors,
    bias along the last axis; no gradient): callers pass a GEMM output nothing else reads."""
    return _run_custom_op("cpu_bias_gelu", x, bias)[0]


def run_cpu_bias_residual(y: paddle.Tensor, bias: paddle.Tensor, residual: paddle.Tensor) -> paddle.Tensor:
    """The library's ``residual + (y + bias)`` operator, written over ``y`` and returned shaped as
    ``residual`` (float32 CPU; no gradient): callers pass a GEMM output nothing else reads."""
    return _run_custom_op("cpu_bias_residual", y, bias, residual)[0]


class PackedWeight:
    """A linear layer's weight packed into MKL's GEMM layout, kept while the weight and the row count stay.

    ``cblas_sgemm`` copies its B operand into the layout its kernels read on every call; a weight
    that does not change can be packed once and multiplied by ``cblas_sgemm_compute`` (the
    library's ``cpu_gemm_pack`` / ``cpu_packed_gemm``), which saves that copy on every call, most
    for few rows (one image's tokens). MKL lays a pack out for one row count (a pack used for
    another gives the same product but can run slower), so the pack is made for a row count on
    its second call in a row: a single call (one image in a block) costs no packing, a loop over
    same-sized batches packs once, and alternating sizes never repack on every call.

    The pack follows the tensor object, its storage address, its in-place version and its shape:
    a replaced parameter or an in-place Paddle op (``add_``, ``copy_``, ``paddle.assign``) repacks.
    ``set_value``, ``set_state_dict`` and optimizer steps write the same storage without changing
    any of these, so layers hold a pack only inside :func:`paddlemix.inference_mode`, whose
    contract is that weights stay fixed.
    """

    __slots__ = ("_weight", "_key", "_packed")

    def __init__(self) -> None:
        self._weight: Optional[paddle.Tensor] = None
        self._key: Optional[tuple] = None
        self._packed: Optional[paddle.Tensor] = None

    def __reduce__(self):
        # A copied, deep-copied or pickled layer gets an empty pack: MKL's pack is only valid at
        # the address it was written to, and a copy's weight is another tensor anyway.
        return (PackedWeight, ())

    def packed(self, weight: paddle.Tensor, rows: int) -> Optional[paddle.Tensor]:
        """The pack of ``weight`` [K, N] for products with ``rows`` rows; None on the first call
        for this weight state and row count (the caller runs the unpacked GEMM)."""
        key = (weight.data_ptr(), weight._inplace_version(), tuple(weight.shape), rows)
        if self._weight is weight and self._key == key:
            if self._packed is None:
                self._packed = _run_custom_op("cpu_gemm_pack", weight, int(rows))[0]
            return self._packed
        self._weight, self._key, self._packed = weight, key, None
        return None


def _takes_grad(*tensors: Optional[paddle.Tensor]) -> bool:
    """Whether autograd will record a call on ``tensors`` (None entries are absent operands)."""
    return paddle.is_grad_enabled() and not all(t.stop_gradient for t in tensors if t is not None)


def _product(
    x2: paddle.Tensor,
    weight: paddle.Tensor,
    bias: Optional[paddle.Tensor],
    packed: Optional[PackedWeight],
    grad: Optional[bool] = None,
) -> Optional[paddle.Tensor]:
    """``x2`` [M, K] @ ``weight`` (+ ``bias``, rounded as ``addmm`` rounds it) with the packed weight,
    or None where :func:`choose` keeps Paddle's GEMM (no pack, a gradient, not float32 on a CPU)
    or the pack is not made yet (its first call). ``grad``: known already (the fused inference
    operators' callers checked it), else found here."""
    if packed is None:
        return None
    fp32 = weight.dtype == paddle.float32 and (bias is None or bias.dtype == paddle.float32)
    if grad is None:
        grad = _takes_grad(x2, weight, bias)
    if choose("gemm", x2, params_fp32=fp32, grad=grad, packed=True) != "packed":
        return None
    pack = packed.packed(weight, x2.shape[0])
    if pack is None:
        return None
    k, n = weight.shape
    with_bias = bias is not None
    return _run_custom_op("cpu_packed_gemm", x2, pack, bias if with_bias else paddle.empty([0]), k, n, with_bias)[0]


def run_cpu_softmax(x: paddle.Tensor) -> paddle.Tensor:
    """The library's last-axis softmax operator (float32 CPU tensors, differentiable)."""
    return _run_custom_op("cpu_softmax", x)[0]


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


def addmm_linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """``F.linear(x, weight, bias)`` as ``addmm`` (float32 ``x`` of any rank).

    In a static graph built on a CPU (an export), Paddle Inference then runs the same ``addmm``
    kernel as dynamic mode, which measured faster than what its own passes make of
    ``matmul`` + ``add`` (README, Performance).
    """
    shape = x.shape
    x2 = x.reshape([-1, shape[-1]])
    if not paddle.in_dynamic_mode():
        y = paddle.addmm(bias, x2, weight)
        return y.reshape([-1 if d is None or d < 0 else d for d in shape[:-1]] + [weight.shape[-1]])
    if _takes_grad(x, weight, bias):
        y = _AddmmLinear.apply(x2, weight, bias)
    else:
        y = paddle.addmm(bias, x2, weight)
    return y.reshape(shape[:-1] + [y.shape[-1]])


def linear(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    bias: Optional[paddle.Tensor],
    impl: Optional[str] = None,
    packed: Optional[PackedWeight] = None,
):
    """``x @ weight + bias`` by the implementation :func:`choose` names (``addmm`` needs a bias);
    ``packed``: the layer's :class:`PackedWeight`, used where :func:`choose` picks it for ``gemm``."""
    if impl is None and packed is not None:
        y = _product(x.reshape([-1, x.shape[-1]]), weight, bias, packed)
        if y is not None:
            return y.reshape(x.shape[:-1] + [weight.shape[-1]])
    fp32 = bias is not None and weight.dtype == paddle.float32
    if choose("linear", x, impl=impl, params_fp32=fp32) == "addmm":
        return addmm_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def gelu(x: paddle.Tensor, impl: Optional[str] = None) -> paddle.Tensor:
    """Exact (erf) GELU."""
    if choose("gelu", x, impl=impl) == "paddlemix":
        return run_cpu_gelu(x)
    return F.gelu(x)


def _inference_only_choice(op: str, x, weight, bias, impl: Optional[str], *others: paddle.Tensor) -> str:
    """``choose`` for the fused inference operators, which need a float32 bias and no gradient
    through ``x``, ``weight``, ``bias`` or ``others``."""
    fp32 = bias is not None and weight.dtype == paddle.float32
    grad = _takes_grad(x, weight, bias, *others)
    chosen = choose(op, x, impl=impl, params_fp32=fp32, grad=grad)
    if chosen == "paddlemix" and (grad or not fp32):
        raise ValueError(f"{op} implementation 'paddlemix' has no gradient and needs a float32 bias; "
                         "call it under paddle.no_grad() or pass impl=None")
    return chosen


def _gemm(x2: paddle.Tensor, weight: paddle.Tensor, packed: Optional[PackedWeight]) -> paddle.Tensor:
    """``x2`` [M, K] @ ``weight`` inside a fused inference operator (no gradient, checked by
    :func:`_inference_only_choice`), with the packed weight where :func:`choose` picks it."""
    y = _product(x2, weight, None, packed, grad=False)
    return paddle.matmul(x2, weight) if y is None else y


def linear_gelu(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    bias: Optional[paddle.Tensor],
    impl: Optional[str] = None,
    packed: Optional[PackedWeight] = None,
):
    """``gelu(x @ weight + bias)`` (exact GELU) by the implementation :func:`choose` names."""
    if _inference_only_choice("linear_gelu", x, weight, bias, impl) == "paddlemix":
        shape = x.shape
        y = _gemm(x.reshape([-1, shape[-1]]), weight, packed)
        return run_cpu_bias_gelu(y, bias).reshape(shape[:-1] + [weight.shape[-1]])
    return gelu(linear(x, weight, bias, packed=packed))


def linear_residual(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    bias: Optional[paddle.Tensor],
    residual: paddle.Tensor,
    impl: Optional[str] = None,
    packed: Optional[PackedWeight] = None,
) -> paddle.Tensor:
    """``residual + (x @ weight + bias)`` by the implementation :func:`choose` names."""
    if _inference_only_choice("linear_residual", x, weight, bias, impl, residual) == "paddlemix":
        y = _gemm(x.reshape([-1, x.shape[-1]]), weight, packed)
        return run_cpu_bias_residual(y, bias, residual).reshape(residual.shape)
    return residual + linear(x, weight, bias, packed=packed)


def softmax(x: paddle.Tensor, impl: Optional[str] = None) -> paddle.Tensor:
    """Softmax over the last axis."""
    if choose("softmax", x, impl=impl) == "paddlemix":
        return run_cpu_softmax(x)
    return F.softmax(x, axis=-1)


def layer_norm(x, normalized_shape, weight, bias, epsilon: float, training: bool = False, impl: Optional[str] = None):
    """LayerNorm of the input's dtype (the caller upcasts low precision)."""
    has_affine = weight is not None and bias is not None
    if choose("layer_norm", x, impl=impl, training=training, params_fp32=has_affine) == "paddlemix":
        return run_fused_ln(x, None, weight, bias, epsilon, False)[0]
    return F.layer_norm(x, normalized_shape, weight, bias, epsilon)
