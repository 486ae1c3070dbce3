"""LayerNorm / RMSNorm backed by the `fused_ln` custom operator (paddlemix/kernels/).

The operator adds an optional residual and normalises in one pass over memory,
forward and backward, on CPU (AVX2 + OpenMP) and, when Paddle is built with
CUDA, on GPU. The layers here are drop-in subclasses of
`paddlemix.models.layers.LayerNorm` / `RMSNorm`: same parameters, same state
dict keys, same numbers (within fp32 rounding), so a config can switch
`fusedLN` on or off without touching checkpoints.

The operator comes from the library that :mod:`paddlemix.kernels` loads (built ahead by
``python -m paddlemix.kernels build``; nothing is compiled at run time). Without it the layers
use the exact reference math, after that module's one warning; ``require_op=True`` turns the
fallback into a :class:`~paddlemix.kernels.ops.KernelUnavailableError` instead. The operator
itself, and the library's other kernels, are called directly through :mod:`paddlemix.kernels.ops`.

Inputs the operator does not cover fall back to the reference silently, since
that is a property of the input and not of the build: dtypes other than
float32 / float16 / bfloat16, devices other than CPU (and GPU with a CUDA
Paddle), and GPU rows longer than 8192. float16 / bfloat16 on CPU are computed
in float32 inside the operator, like the reference layers do.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .. import kernels
from ..kernels import dispatch, ops
from .layers import LayerNorm, RMSNorm

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
    "fused_norm_layer",
]


def _require_or_warn(require_op: bool) -> bool:
    """True when the operator can be used; otherwise raise (require_op) or fall back after one warning."""
    if require_op:
        ops.require("fused_ln", "pass require_op=False to fall back to paddle.nn.functional.layer_norm")
    return kernels.available()


def _op_handles(x: paddle.Tensor) -> bool:
    return dispatch.choose("fused_norm", x) == "paddlemix"


_run_op = dispatch.run_fused_ln


def _reference_layer_norm(x, weight, bias, epsilon: float) -> paddle.Tensor:
    """paddlemix.models.layers.LayerNorm math (fp32 statistics for fp16/bf16)."""
    dtype = x.dtype
    shape = x.shape[-1:]
    if dtype in (paddle.float16, paddle.bfloat16):
        w = None if weight is None else weight.astype("float32")
        b = None if bias is None else bias.astype("float32")
        return F.layer_norm(x.astype("float32"), shape, w, b, epsilon).astype(dtype)
    return F.layer_norm(x, shape, weight, bias, epsilon)


def _reference_rms_norm(x, weight, epsilon: float) -> paddle.Tensor:
    """paddlemix.models.layers.RMSNorm math."""
    dtype = x.dtype
    xf = x.astype("float32")
    y = xf * paddle.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    if weight is not None:
        y = y * weight.astype("float32")
    return y.astype(dtype)


def _fused_add_norm(x, residual, weight, bias, epsilon: float, rms_norm: bool, require_op: bool):
    if _require_or_warn(require_op) and _op_handles(x):
        y, s, _, _ = _run_op(x, residual, weight, bias, epsilon, rms_norm)
        return y, s
    s = x + residual
    if rms_norm:
        return _reference_rms_norm(s, weight, epsilon), s
    return _reference_layer_norm(s, weight, bias, epsilon), s


def fused_add_layer_norm(
    x: paddle.Tensor,
    residual: paddle.Tensor,
    weight: Optional[paddle.Tensor],
    bias: Optional[paddle.Tensor],
    eps: float = 1e-5,
    *,
    require_op: bool = False,
) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Returns ``(layer_norm(x + residual), x + residual)`` over the last axis.

    The pair replaces ``s = x + residual; y = norm(s)`` in a pre-norm block: one
    pass reads x and residual and writes both s (the next residual stream) and
    y, and the backward pass adds the gradient arriving at s into dx itself.
    """
    return _fused_add_norm(x, residual, weight, bias, eps, False, require_op)


def fused_add_rms_norm(
    x: paddle.Tensor,
    residual: paddle.Tensor,
    weight: Optional[paddle.Tensor],
    eps: float = 1e-6,
    *,
    require_op: bool = False,
) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``; see fused_add_layer_norm."""
    return _fused_add_norm(x, residual, weight, None, eps, True, require_op)


class FusedLayerNorm(LayerNorm):
    """`layers.LayerNorm` computed by the fused_ln operator when it is available.

    ``require_op=True`` raises KernelUnavailableError at construction if the
    operator cannot be loaded, instead of warning and using the reference path.
    """

    def __init__(self, dim: int, epsilon: float = 1e-5, require_op: bool = False):
        super().__init__(dim, epsilon=epsilon)
        self.require_op = require_op
        self.use_op = _require_or_warn(require_op)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.use_op and _op_handles(x):
            return _run_op(x, None, self.weight, self.bias, self._epsilon, False)[0]
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused_op={self.use_op}"


class FusedRMSNorm(RMSNorm):
    """`layers.RMSNorm` computed by the fused_ln operator when it is available."""

    def __init__(self, dim: int, epsilon: float = 1e-6, require_op: bool = False):
        super().__init__(dim, epsilon=epsilon)
        self.require_op = require_op
        self.use_op = _require_or_warn(require_op)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.use_op and _op_handles(x):
            return _run_op(x, None, self.weight, None, self.epsilon, True)[0]
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, fused_op={self.use_op}"


def fused_norm_layer(use_rms_norm: bool, eps: float, require_op: bool = False) -> Callable[[int], nn.Layer]:
    """Norm factory for towers whose config sets ``fusedLN`` (see layers.get_norm_layer)."""
    if use_rms_norm:
        return lambda dim: FusedRMSNorm(dim, epsilon=eps, require_op=require_op)
    return lambda dim: FusedLayerNorm(dim, epsilon=eps, require_op=require_op)
