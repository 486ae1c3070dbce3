"""CPU settings that make Paddle fast, applied by ``import paddlemix`` itself.

Four settings decide much of Paddle's CPU speed and none can be a model argument, because the
libraries read them from the environment once. When each is read decides when it can be set
(measured by tracing getenv in Paddle 3.3.1's process):

* ``MKL_DEBUG_CPU_TYPE=5``. The MKL that Paddle bundles picks its kernels by CPU vendor
  and gives AMD CPUs a generic SSE path; 5 selects the AVX2 kernels, which every AVX2 CPU
  runs, several times faster on fp32 GEMMs (numbers in the README's Performance section).
  Set only on AMD CPUs with AVX2: on Intel CPUs MKL already
  picks the best path, and forcing AVX2 there would turn off AVX-512. MKL reads it at its
  first computation, not when Paddle loads, so ``import paddlemix`` after ``import paddle``
  still sets it in time (not after the program has already run a Paddle matmul).
* The thread count. When ``OMP_NUM_THREADS`` is unset, ``import paddle`` sets it to 1 (a
  default chosen for multi-process data parallel), so a single process uses one core; set
  before Paddle loads, any other value makes Paddle print a warning. Intel's OpenMP and MKL
  read it at the first computation too, so paddlemix sets it *after* Paddle has loaded (and
  calls Paddle's ``set_num_threads``): the CPUs this process may use, divided among the
  processes a ``paddle.distributed.launch`` job starts on this node.
* ``GOMP_SPINCOUNT=0``. Paddle's math runs on Intel's OpenMP (libiomp5). Where Paddle bundles
  that runtime (its x86 wheels), paddlemix.kernels are linked to it too, so the process has one
  thread pool (``kernels/build_config.link_flags``). Elsewhere they run on GNU's libgomp: two
  pools for the same cores, and libgomp's threads spin after each parallel region, taking the
  cores from the next MKL call, unless told to sleep when idle. libgomp reads it when Paddle
  loads, so only ``import paddlemix`` *before* ``import paddle`` sets it.
* Freed-memory reuse (a call, not a variable; any time): glibc returns every freed block
  above 128 KiB to the kernel, and Paddle's CPU allocator frees each activation after use, so
  every new activation page-faults on first write, and a forward pass spends a large share of
  its time in those faults. ``mallopt``
  raises the mmap and trim thresholds so freed memory is reused; the cost is that the process
  keeps its peak heap instead of shrinking (a few percent of its memory). Skipped
  when ``MALLOC_MMAP_THRESHOLD_`` is set.

None of these changes what is computed, only how fast: the AVX2 kernels use FMA, so float32
results differ from the generic path by float32 rounding only, as do results under another
thread count (tests compare both against the same references).

A variable the user set (in the shell, or in ``os.environ`` before ``import paddle``) is never
overridden. :func:`configure_process` is what ``paddlemix/__init__`` runs; scripts may also run
this file before anything imports Paddle (``runpy.run_path(".../paddlemix/_env.py",
run_name="paddlemix_apply_cpu_env")``), and ``python paddlemix/_env.py --shell`` prints the
settings as ``export`` lines instead. This module uses only the standard library at import
time and must stay that way.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, MutableMapping, Optional, Set

logger = logging.getLogger("paddlemix._env")

__all__ = ["apply_cpu_env", "available_cpus", "configure_process", "recommended_env", "retain_freed_memory"]

_CPUINFO = Path("/proc/cpuinfo")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_RETAIN_BYTES = 1 << 30  # blocks below this come from the heap and go back to it
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_INITIAL_ENVIRON = Path("/proc/self/environ")
# Read when Paddle loads (libgomp, Paddle's own bootstrap): only settable before `import paddle`.
_BEFORE_PADDLE_ONLY = ("GOMP_SPINCOUNT",)
_THREADS = "OMP_NUM_THREADS"
# Printed while Paddle / PaddleNLP load; about compiling custom ops and setuptools, not the user's concern.
_QUIET_MESSAGES = ("No ccache found", "Setuptools is replacing distutils")


def _cpuinfo_fields(text: str) -> Dict[str, str]:
    """The fields of the first processor block of /proc/cpuinfo."""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _cpu_vendor_and_flags(cpuinfo_text: Optional[str] = None) -> tuple:
    if cpuinfo_text is None:
        try:
            cpuinfo_text = _CPUINFO.read_text()
        except OSError:
            return "", set()
    fields = _cpuinfo_fields(cpuinfo_text)
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


def _cgroup_cpu_limit(text: Optional[str] = None) -> Optional[int]:
    """Whole CPUs allowed by a cgroup v2 quota ("200000 100000" -> 2), None when unlimited."""
    if text is None:
        try:
            text = _CGROUP_CPU_MAX.read_text()
        except OSError:
            return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        return max(1, int(parts[0]) // int(parts[1]))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


def _local_processes(environ: MutableMapping[str, str]) -> int:
    """Processes of a ``paddle.distributed.launch`` job on this node (1 outside one)."""
    try:
        return max(1, int(environ.get("PADDLE_LOCAL_SIZE", "1")))
    except ValueError:
        return 1


def recommended_env(
    environ: Optional[MutableMapping[str, str]] = None,
    cpuinfo_text: Optional[str] = None,
    cpus: Optional[int] = None,
) -> Dict[str, str]:
    """The variables and values this machine should run Paddle with (whether set or not)."""
    environ = os.environ if environ is None else environ
    vendor, flags = _cpu_vendor_and_flags(cpuinfo_text)
    env: Dict[str, str] = {}
    if vendor == "AuthenticAMD" and "avx2" in flags:
        env["MKL_DEBUG_CPU_TYPE"] = "5"
    cpus = available_cpus() if cpus is None else cpus
    env["OMP_NUM_THREADS"] = str(max(1, cpus // _local_processes(environ)))
    env["GOMP_SPINCOUNT"] = "0"
    return env


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks (up to 1 GiB each) for reuse; True if it took effect."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _RETAIN_BYTES) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _RETAIN_BYTES) == 1)
    except (OSError, AttributeError):
        return False


def _initial_environ_keys() -> Optional[Set[str]]:
    """Names of the variables this process was started with (Linux), None where unknown.

    ``import paddle`` writes ``OMP_NUM_THREADS=1`` into ``os.environ``; the process's start-up
    environment tells that default apart from a value the user exported.
    """
    try:
        raw = _INITIAL_ENVIRON.read_bytes()
    except OSError:
        return None
    return {item.split(b"=", 1)[0].decode("utf-8", "replace") for item in raw.split(b"\0") if item}


def _user_set(environ: MutableMapping[str, str], paddle_loaded: bool, initial: Optional[Set[str]]) -> Set[str]:
    """The variables of recommended_env that the user chose (and paddlemix must leave alone)."""
    user = set(environ)
    if paddle_loaded and environ.get(_THREADS) == "1":
        # 1 is Paddle's default when the variable was unset at its import; the user's only if
        # the process started with it (or, where that is unknown, to stay on the safe side).
        if initial is not None and _THREADS not in initial:
            user.discard(_THREADS)
    return user


def apply_cpu_env(
    environ: Optional[MutableMapping[str, str]] = None,
    modules: Optional[Set[str]] = None,
    cpuinfo_text: Optional[str] = None,
    cpus: Optional[int] = None,
    retain_memory: bool = True,
) -> Dict[str, str]:
    """Set the recommended variables the user has not set that are still read later; returns those set.

    Before Paddle loads: ``MKL_DEBUG_CPU_TYPE`` and ``GOMP_SPINCOUNT``, but not the thread
    count, which :func:`configure_process` sets once Paddle has loaded (set earlier, Paddle
    prints a warning about it). After Paddle has loaded: only ``MKL_DEBUG_CPU_TYPE``, which MKL
    reads at its first computation; ``GOMP_SPINCOUNT`` is then logged at debug level as missed.
    Also calls :func:`retain_freed_memory` unless ``retain_memory`` is False or the user set
    ``MALLOC_MMAP_THRESHOLD_``. ``environ``, ``modules`` (names of imported modules),
    ``cpuinfo_text`` and ``cpus`` default to this process; tests pass their own.
    """
    environ = os.environ if environ is None else environ
    modules = set(sys.modules) if modules is None else modules
    paddle_loaded = "paddle" in modules
    wanted = {k: v for k, v in recommended_env(environ, cpuinfo_text, cpus).items() if k not in environ}
    wanted.pop(_THREADS, None)
    if paddle_loaded:
        missed = {k: wanted.pop(k) for k in _BEFORE_PADDLE_ONLY if k in wanted}
        if missed:
            logger.debug("paddle was imported before paddlemix, so %s cannot take effect", missed)
    if retain_memory and "MALLOC_MMAP_THRESHOLD_" not in environ and environ is os.environ:
        retain_freed_memory()
    environ.update(wanted)
    logger.debug("CPU environment: set %s", wanted)
    return wanted


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence the warnings Paddle and PaddleNLP print while they load, which are not the user's concern.

    Paddle warns "No ccache found" (about compiling custom operators: paddlemix never compiles
    at run time) and PaddleNLP's imports trigger setuptools' "Setuptools is replacing distutils".
    Only these two messages, and only while paddlemix imports them.
    """
    with warnings.catch_warnings():
        for message in _QUIET_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        yield


def configure_process(
    environ: Optional[MutableMapping[str, str]] = None,
    cpuinfo_text: Optional[str] = None,
    cpus: Optional[int] = None,
) -> Dict[str, str]:
    """What ``import paddlemix`` does: :func:`apply_cpu_env`, then import Paddle and set the threads.

    Works whether or not Paddle is already imported (see the module docstring for what each
    order can still set); Paddle is loaded under :func:`quiet_imports`. Returns the settings it made.
    """
    environ = os.environ if environ is None else environ
    paddle_loaded = "paddle" in sys.modules
    user = _user_set(environ, paddle_loaded, _initial_environ_keys() if environ is os.environ else None)
    applied = apply_cpu_env(environ=environ, cpuinfo_text=cpuinfo_text, cpus=cpus)
    if not paddle_loaded:
        with quiet_imports():
            import paddle  # noqa: F401  (its bootstrap writes OMP_NUM_THREADS=1 when unset)
    if _THREADS not in user:
        threads = recommended_env(environ, cpuinfo_text, cpus)[_THREADS]
        environ[_THREADS] = threads  # read by Intel's OpenMP and MKL at their first computation
        from paddle.base import core

        core.set_num_threads(int(threads))  # in case they have already started
        applied[_THREADS] = threads
    return applied


def _main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Paddle CPU environment settings for this machine.")
    parser.add_argument("--shell", action="store_true", help="print the settings as shell export lines")
    args = parser.parse_args(argv)
    if args.shell:
        for key, value in sorted(recommended_env().items()):
            print(f"export {key}={value}")
        return 0
    apply_cpu_env()
    return 0


APPLY_RUN_NAME = "paddlemix_apply_cpu_env"

if __name__ == "__main__":
    sys.exit(_main())
if __name__ == APPLY_RUN_NAME:  # an entry-point script of ours, before it imports Paddle
    apply_cpu_env()
    for _message in _QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=_message)
