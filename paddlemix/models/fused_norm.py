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
fallback into an error instead.

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
from ..kernels import dispatch
from ..errors import PaddleMIXError
from .layers import LayerNorm, RMSNorm

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "FusedNormUnavailableError",
    "fused_add_layer_norm",
    "fused_add_rms_norm",
    "cpu_gelu",
    "cpu_softmax",
    "fused_ln",
    "fused_norm_layer",
    "fused_op_status",
]


class FusedNormUnavailableError(PaddleMIXError, RuntimeError):
    """The fused_ln operator was required (``require_op=True``) but its library is not loaded."""


def fused_op_status() -> kernels.KernelStatus:
    """Whether the kernel library is loaded (see :func:`paddlemix.kernels.status`)."""
    return kernels.status()


def _require_or_warn(require_op: bool) -> bool:
    """True when the operator can be used; otherwise raise (require_op) or fall back after one warning."""
    if require_op and not kernels.status().available:
        raise FusedNormUnavailableError(
            f"the fused_ln operator is unavailable: {kernels.status().detail}. Build it with "
            f"`{kernels.BUILD_COMMAND}`, or pass require_op=False to fall back to paddle.nn.functional.layer_norm."
        )
    return kernels.available()


def _op_handles(x: paddle.Tensor) -> bool:
    return dispatch.choose("fused_norm", x) == "paddlemix"


_run_op = dispatch.run_fused_ln


def fused_ln(
    x: paddle.Tensor,
    residual: Optional[paddle.Tensor] = None,
    weight: Optional[paddle.Tensor] = None,
    bias: Optional[paddle.Tensor] = None,
    epsilon: float = 1e-5,
    rms_norm: bool = False,
    portable: bool = False,
) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The raw operator: ``(y, residual_out, mean, rstd)``, no fallback.

    residual_out is ``x + residual`` (an empty ``[0]`` tensor without a
    residual); mean and rstd are the float32 row statistics. ``portable`` forces
    the non-AVX2 CPU kernels, for comparing the two. Raises
    FusedNormUnavailableError when the operator cannot be loaded.
    """
    _require_or_warn(require_op=True)
    return _run_op(x, residual, weight, bias, epsilon, rms_norm, portable)


def cpu_gelu(x: paddle.Tensor) -> paddle.Tensor:
    """Exact GELU by the library's ``cpu_gelu`` operator (float32 CPU tensors; differentiable)."""
    _require_or_warn(require_op=True)
    return dispatch.run_cpu_gelu(x)


def cpu_softmax(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis by the library's ``cpu_softmax`` operator (float32 CPU tensors)."""
    _require_or_warn(require_op=True)
    return dispatch.run_cpu_softmax(x)


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

    ``require_op=True`` raises FusedNormUnavailableError at construction if the
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
