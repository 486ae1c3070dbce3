"""LayerNorm / RMSNorm backed by the `fused_ln` custom operator (external_ops/).

The operator adds an optional residual and normalises in one pass over memory,
forward and backward, on CPU (AVX2 + OpenMP) and, when Paddle is built with
CUDA, on GPU. The layers here are drop-in subclasses of
`paddlemix.models.layers.LayerNorm` / `RMSNorm`: same parameters, same state
dict keys, same numbers (within fp32 rounding), so a config can switch
`fusedLN` on or off without touching checkpoints.

How the operator is found, once per process:
1. the installed module `paddlemix_fused_ln` (`python external_ops/setup.py install`);
2. otherwise a JIT build of external_ops/ with `paddle.utils.cpp_extension`,
   cached under ``$PADDLEMIX_EXTENSION_DIR`` (default
   ``~/.cache/paddlemix/extensions``) and keyed by a hash of the sources, flags
   and Paddle version, so it compiles once (~10 s on 2 cores) and later
   processes only load the shared library;
3. otherwise the layers fall back to the exact reference math, after one
   `logging` warning that says why. ``require_op=True`` turns that fallback into
   an error instead.

Inputs the operator does not cover fall back to the reference silently, since
that is a property of the input and not of the build: dtypes other than
float32 / float16 / bfloat16, devices other than CPU (and GPU with a CUDA
Paddle), and GPU rows longer than 8192. float16 / bfloat16 on CPU are computed
in float32 inside the operator, like the reference layers do.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

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

_logger = logging.getLogger(__name__)

OPS_DIR = Path(__file__).resolve().parents[2] / "external_ops"
CACHE_DIR_ENV = "PADDLEMIX_EXTENSION_DIR"
_OP_NAME = "fused_ln"
_OP_DTYPES = (paddle.float32, paddle.float16, paddle.bfloat16)
_CUDA_MAX_COLS = 8192  # fused_ln_cuda.cuh: kMaxCols


class FusedNormUnavailableError(PaddleMIXError, RuntimeError):
    """The fused_ln operator was required (``require_op=True``) but cannot be loaded."""


@dataclass(frozen=True)
class OpStatus:
    available: bool
    origin: str  # "installed", "jit-cache", "jit-build" or "" when unavailable
    detail: str  # where it came from, or why it is unavailable


_lock = threading.Lock()
_status: Optional[OpStatus] = None
_warned = False


def _cache_root() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "paddlemix" / "extensions"


def _load_build_config() -> ModuleType:
    path = OPS_DIR / "build_config.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"kernel sources not found: {path} is missing (external_ops/ ships with the source tree, not with "
            "a wheel; install the op with `python external_ops/setup.py install` from a checkout)"
        )
    spec = importlib.util.spec_from_file_location("_paddlemix_fused_ln_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _register_library(so_path: Path) -> None:
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    load_op_meta_info_and_register_op(str(so_path))


def _jit_build(cfg: ModuleType) -> OpStatus:
    with_cuda = paddle.is_compiled_with_cuda()
    missing = cfg.missing_files(with_cuda)
    if missing:
        raise FileNotFoundError(f"kernel sources missing: {', '.join(missing)}")
    digest = cfg.source_digest(with_cuda, paddle.__version__)
    final = _cache_root() / f"{cfg.OP_NAME}-{digest}"
    so_path = final / cfg.MODULE_NAME / f"{cfg.MODULE_NAME}.so"
    if so_path.is_file():
        _register_library(so_path)
        return OpStatus(True, "jit-cache", str(so_path))

    from paddle.utils.cpp_extension import load

    final.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename it into place, so concurrent
    # processes never load a half-written library.
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    _logger.info("building the %s operator into %s (one-off, about 10 s)", cfg.OP_NAME, final)
    try:
        load(
            name=cfg.MODULE_NAME,
            sources=cfg.sources(with_cuda),
            build_directory=str(tmp),
            verbose=False,
            **cfg.extension_flags(with_cuda),
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its library is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return OpStatus(True, "jit-build", str(final))


def _load_op() -> OpStatus:
    """Find or build the operator; never raises, the reason goes into the status."""
    try:
        module = importlib.import_module("paddlemix_fused_ln")
        return OpStatus(True, "installed", getattr(module, "__file__", "paddlemix_fused_ln"))
    except ImportError:
        pass
    if not hasattr(paddle._C_ops, "_run_custom_op"):
        return OpStatus(False, "", f"paddle {paddle.__version__} has no custom-operator runtime (_C_ops._run_custom_op)")
    try:
        return _jit_build(_load_build_config())
    except (OSError, RuntimeError, ValueError, ImportError, AssertionError) as err:
        # paddle's JIT build reports compiler failures as RuntimeError, bad
        # arguments through assert, missing files as OSError: all mean "no operator here".
        return OpStatus(False, "", f"JIT build failed: {type(err).__name__}: {err}")


def fused_op_status() -> OpStatus:
    """Loads (or builds) the operator on first call and reports the outcome."""
    global _status
    with _lock:
        if _status is None:
            _status = _load_op()
            if _status.available:
                _logger.debug("fused_ln operator ready (%s: %s)", _status.origin, _status.detail)
        return _status


def _require_or_warn(require_op: bool) -> bool:
    """True when the operator can be used; otherwise raise (require_op) or warn once."""
    global _warned
    status = fused_op_status()
    if status.available:
        return True
    if require_op:
        raise FusedNormUnavailableError(
            f"the fused_ln operator is unavailable: {status.detail}. Build it with "
            "`python external_ops/setup.py install`, or pass require_op=False to fall back to "
            "paddle.nn.functional.layer_norm."
        )
    if not _warned:
        _warned = True
        _logger.warning(
            "fused_ln operator unavailable (%s); fused norm layers fall back to the reference "
            "LayerNorm/RMSNorm math (same results, unfused speed). Pass require_op=True to make this an error.",
            status.detail,
        )
    return False


def _op_handles(x: paddle.Tensor) -> bool:
    if x.dtype not in _OP_DTYPES or x.ndim == 0:
        return False
    place = x.place
    if place.is_cpu_place():
        return True
    return place.is_gpu_place() and paddle.is_compiled_with_cuda() and x.shape[-1] <= _CUDA_MAX_COLS


def _run_op(
    x: paddle.Tensor,
    residual: Optional[paddle.Tensor],
    weight: Optional[paddle.Tensor],
    bias: Optional[paddle.Tensor],
    epsilon: float,
    rms_norm: bool,
    portable: bool = False,
) -> Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    outs = paddle._C_ops._run_custom_op(
        _OP_NAME, x, residual, weight, bias, float(epsilon), bool(rms_norm), bool(portable)
    )
    return tuple(outs)


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
    return paddle._C_ops._run_custom_op("cpu_gelu", x)[0]


def cpu_softmax(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis by the library's ``cpu_softmax`` operator (float32 CPU tensors)."""
    _require_or_warn(require_op=True)
    return paddle._C_ops._run_custom_op("cpu_softmax", x)[0]


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
