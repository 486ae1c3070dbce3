"""The library's operators called directly, with no fallback: ``fused_ln``, ``cpu_gelu``, ``cpu_softmax``.

Layers never call these: they ask :mod:`.dispatch`, which runs Paddle's own kernels when the
library is not loaded. These entries are for code that wants the operator itself (tests that
compare it with the reference math, benchmarks, norm layers built with ``require_op=True``), so
a missing library is an error that names the build command, not a silent fallback.
"""
from __future__ import annotations

from typing import Optional, Tuple

import paddle

from ..errors import PaddleMIXError
from . import BUILD_COMMAND, status
from .dispatch import run_cpu_gelu, run_cpu_softmax, run_fused_ln

__all__ = ["KernelUnavailableError", "cpu_gelu", "cpu_softmax", "fused_ln", "require"]


class KernelUnavailableError(PaddleMIXError, RuntimeError):
    """An operator of the kernel library was required, but the library is not loaded."""


def require(what: str, fallback: str) -> None:
    """Raise :class:`KernelUnavailableError` for ``what`` unless the library is loaded.

    ``fallback`` tells the caller how to do without it (part of the message).
    """
    current = status()
    if not current.available:
        raise KernelUnavailableError(
            f"the {what} operator is unavailable: {current.detail}. Build it with `{BUILD_COMMAND}`, or {fallback}."
        )


def fused_ln(
    x: paddle.Tensor,
    residual: Optional[paddle.Tensor] = None,
    weight: Optional[paddle.Tensor] = None,
    bias: Optional[paddle.Tensor] = None,
    epsilon: float = 1e-5,
    rms_norm: bool = False,
    portable: bool = False,
) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """The fused (residual add +) LayerNorm/RMSNorm operator: ``(y, residual_out, mean, rstd)``.

    residual_out is ``x + residual`` (an empty ``[0]`` tensor without a residual); mean and rstd
    are the float32 row statistics. ``portable`` forces the non-AVX2 CPU kernels, for comparing
    the two.
    """
    require("fused_ln", "use paddlemix.models.fused_norm's layers, which fall back to Paddle's layer_norm")
    return run_fused_ln(x, residual, weight, bias, epsilon, rms_norm, portable)


def cpu_gelu(x: paddle.Tensor) -> paddle.Tensor:
    """Exact GELU by the library's ``cpu_gelu`` operator (float32 CPU tensors; differentiable)."""
    require("cpu_gelu", "use paddlemix.kernels.dispatch.gelu, which falls back to Paddle's gelu")
    return run_cpu_gelu(x)


def cpu_softmax(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis by the library's ``cpu_softmax`` operator (float32 CPU tensors)."""
    require("cpu_softmax", "use paddlemix.kernels.dispatch.softmax, which falls back to Paddle's softmax")
    return run_cpu_softmax(x)
