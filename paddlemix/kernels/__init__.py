"""The one place that decides whether paddlemix's own kernels run, and finds their library.

The ``paddlemix_fused_ln`` library (sources in ``csrc/``) holds the fused LayerNorm/RMSNorm
operator and the CPU GELU and softmax operators that :mod:`paddlemix.models.layers` and
:mod:`paddlemix.models.fused_norm` use where Paddle's own kernels are slow. It is built ahead
of time, by one of::

    python -m paddlemix.kernels build        # into the extension cache (what `make install` runs)
    python external_ops/setup.py install     # as the module paddlemix_fused_ln, from a checkout

At run time this module only *loads* a built library: first an installed ``paddlemix_fused_ln``
module, then the extension cache (``$PADDLEMIX_EXTENSION_DIR``, default
``~/.cache/paddlemix/extensions``) in a directory named by a hash of the sources, flags, Paddle
and Python versions. A compiler never runs on a forward pass: a serving process, a read-only
home or a machine without a compiler gets the same first-request latency as any other. Without
a library, Paddle's kernels compute the same math, after one warning naming the build command.
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
from typing import FrozenSet, Optional

import paddle

__all__ = ["BUILD_COMMAND", "KernelStatus", "available", "build", "cache_root", "library_path", "status"]

_logger = logging.getLogger(__name__)

BUILD_COMMAND = "python -m paddlemix.kernels build"
CACHE_DIR_ENV = "PADDLEMIX_EXTENSION_DIR"
INSTALLED_MODULE = "paddlemix_fused_ln"


@dataclass(frozen=True)
class KernelStatus:
    available: bool
    origin: str  # "installed", "cache" or "" when unavailable
    detail: str  # where the library came from, or why there is none
    # The operators the loaded library registered: some exist only where their dependency does
    # (cpu_attention needs the MKL that Paddle's x86 wheels bundle).
    ops: FrozenSet[str] = frozenset()


_lock = threading.Lock()
_status: Optional[KernelStatus] = None
_warned = False


def cache_root() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "paddlemix" / "extensions"


def _build_config() -> ModuleType:
    from . import build_config

    return build_config


def library_path(root: Optional[Path] = None) -> Path:
    """Where ``build`` puts (and ``status`` looks for) the library matching these sources and this Paddle."""
    cfg = _build_config()
    with_cuda = paddle.is_compiled_with_cuda()
    digest = cfg.source_digest(with_cuda, paddle.__version__)
    root = cache_root() if root is None else Path(root)
    return root / f"{cfg.OP_NAME}-{digest}" / cfg.MODULE_NAME / f"{cfg.MODULE_NAME}.so"


def build(root: Optional[Path] = None, verbose: bool = False) -> Path:
    """Compile the library into the cache (a no-op when it is there); returns its path.

    Needs a C++17 compiler, and nvcc when Paddle is built with CUDA. The build happens in a
    private directory renamed into place, so concurrent builds never load a half-written library.
    """
    cfg = _build_config()
    with_cuda = paddle.is_compiled_with_cuda()
    missing = cfg.missing_files(with_cuda)
    if missing:
        raise FileNotFoundError(f"kernel sources missing: {', '.join(missing)}; reinstall paddlemix")
    so_path = library_path(root)
    if so_path.is_file():
        return so_path
    final = so_path.parents[1]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    from paddle.utils.cpp_extension import load

    _logger.info("building the %s kernels into %s", cfg.OP_NAME, final)
    try:
        load(
            name=cfg.MODULE_NAME,
            sources=cfg.sources(with_cuda),
            build_directory=str(tmp),
            verbose=verbose,
            **cfg.extension_flags(with_cuda),
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first; its library is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return so_path


def _load() -> KernelStatus:
    """Load a built library; never compiles and never raises (the reason goes into the status)."""
    try:
        module = importlib.import_module(INSTALLED_MODULE)
        ops = frozenset(name for name in dir(module) if not name.startswith("_"))
        return KernelStatus(True, "installed", getattr(module, "__file__", INSTALLED_MODULE), ops)
    except ImportError:
        pass
    if not hasattr(paddle._C_ops, "_run_custom_op"):
        return KernelStatus(False, "", f"paddle {paddle.__version__} has no custom-operator runtime")
    try:
        so_path = library_path()
    except OSError as err:
        return KernelStatus(False, "", f"kernel sources unreadable: {err}")
    if not so_path.is_file():
        return KernelStatus(False, "", f"not built for paddle {paddle.__version__} (looked for {so_path})")
    from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

    try:
        ops = frozenset(load_op_meta_info_and_register_op(str(so_path)))
    except (OSError, RuntimeError, ValueError) as err:
        return KernelStatus(False, "", f"{so_path} does not load: {type(err).__name__}: {err}")
    return KernelStatus(True, "cache", str(so_path), ops)


def status() -> KernelStatus:
    """Whether the library is loaded; the first call loads it (milliseconds), later calls are cached."""
    global _status
    if _status is not None:  # every layer call asks: answer without the lock once known
        return _status
    with _lock:
        if _status is None:
            _status = _load()
            if _status.available:
                _logger.debug("paddlemix kernels loaded (%s: %s)", _status.origin, _status.detail)
        return _status


def available() -> bool:
    """True when the library is loaded; otherwise False after one warning saying how to build it."""
    global _warned
    current = status()
    if current.available:
        return True
    if not _warned:
        _warned = True
        _logger.warning(
            "paddlemix kernels unavailable (%s): Paddle's own LayerNorm/GELU/softmax kernels are used "
            "(same results, slower on CPUs). Build them once with `%s`.",
            current.detail,
            BUILD_COMMAND,
        )
    return False
