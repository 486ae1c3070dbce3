"""Process environment that makes Paddle fast on CPUs, applied before Paddle is imported.

Three variables decide much of Paddle's CPU speed and none can be a model argument,
because the libraries read them from the environment once, when they start:

* ``MKL_DEBUG_CPU_TYPE=5``. The MKL that Paddle bundles picks its kernels by CPU vendor
  and gives AMD CPUs a generic SSE path; 5 selects the AVX2 kernels, which every AVX2 CPU
  runs. Measured on a 2-core AMD EPYC (AVX2 + FMA): an fp32 800x768 @ 768x3072 matmul
  goes from 36 to 123 GFLOP/s. Set only on AMD CPUs with AVX2: on Intel CPUs MKL already
  picks the best path, and forcing AVX2 there would turn off AVX-512.
* ``OMP_NUM_THREADS``. When it is unset, ``import paddle`` sets it to 1 (a default
  chosen for multi-process data parallel), so a single process uses one core. The
  helper sets it to the CPUs this process may use, divided among the processes a
  ``paddle.distributed.launch`` job starts on this node.
* ``GOMP_SPINCOUNT=0``. Paddle's math runs on Intel's OpenMP (libiomp5), while custom
  operators built with ``-fopenmp`` (the fused LayerNorm of external_ops/) run on GNU's
  libgomp, so a process holds two thread pools for the same cores. libgomp's threads spin
  after each parallel region, taking the cores from the next MKL call: EVA02-CLIP-B-16's
  text tower ran 35% slower with the fused op than without it, and at the same speed once
  libgomp threads sleep when idle.

One setting is not a variable but a call, made at the same time: glibc returns every freed
block above 128 KiB to the kernel, and Paddle's CPU allocator frees each activation after
use, so every new activation page-faults on first write (a 7 MB copy took 12.7 ms instead of
0.3-1.6 ms here, and a ViT-B-32 forward spent ~20% of its time in faults). ``mallopt`` raises the
mmap and trim thresholds so freed memory is reused; the cost is that the process keeps its
peak heap instead of shrinking (+40 MB of 1.2 GB measured on ViT-B-32). It is skipped when
``MALLOC_MMAP_THRESHOLD_`` is set or ``retain_memory=False`` is passed.

None of these changes what is computed, only how fast: the AVX2 kernels use FMA, so float32
results differ from the generic path by rounding only (max abs 5e-6 on ViT-B-32
features of magnitude 4 here; thread count changed at most 2.4e-6).

A variable the user has already set is never overridden. Nothing happens once Paddle is
imported, since whether the libraries have already read their settings cannot be known
from here; a warning says so. Scripts in a source checkout run this file before any
import of Paddle (importing ``paddlemix._env`` would import the package, and with it
Paddle); run under the name ``paddlemix_apply_cpu_env`` it applies the settings::

    runpy.run_path(".../paddlemix/_env.py", run_name="paddlemix_apply_cpu_env")

``python paddlemix/_env.py --shell`` prints the settings as ``export`` lines instead.
This module uses only the standard library and must stay that way.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import platform
import os
import sys
from pathlib import Path
from typing import Dict, List, MutableMapping, Optional, Set

logger = logging.getLogger("paddlemix._env")

__all__ = ["apply_cpu_env", "available_cpus", "recommended_env", "retain_freed_memory", "started_as_cli"]

_CPUINFO = Path("/proc/cpuinfo")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_RETAIN_BYTES = 1 << 30  # blocks below this come from the heap and go back to it
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


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


def apply_cpu_env(
    environ: Optional[MutableMapping[str, str]] = None,
    modules: Optional[Set[str]] = None,
    cpuinfo_text: Optional[str] = None,
    cpus: Optional[int] = None,
    retain_memory: bool = True,
) -> Dict[str, str]:
    """Set every recommended variable the environment does not set yet; returns those set.

    Also calls :func:`retain_freed_memory` unless ``retain_memory`` is False or the user set
    ``MALLOC_MMAP_THRESHOLD_``. A no-op (with a warning naming what was missed) when Paddle
    is already imported. ``environ``, ``modules`` (names of imported modules),
    ``cpuinfo_text`` and ``cpus`` default to this process; tests pass their own.
    """
    environ = os.environ if environ is None else environ
    modules = set(sys.modules) if modules is None else modules
    wanted = {k: v for k, v in recommended_env(environ, cpuinfo_text, cpus).items() if k not in environ}
    if "paddle" in modules:
        if not wanted:
            return {}
        logger.warning(
            "paddle is already imported, so %s cannot take effect reliably and was not set; call "
            "apply_cpu_env() before the first `import paddle` (or export these variables in the shell)",
            " ".join(f"{k}={v}" for k, v in sorted(wanted.items())),
        )
        return {}
    if retain_memory and "MALLOC_MMAP_THRESHOLD_" not in environ and environ is os.environ:
        retain_freed_memory()
    environ.update(wanted)
    logger.debug("CPU environment: set %s", wanted)
    return wanted


def started_as_cli(orig_argv: Optional[List[str]] = None) -> bool:
    """True when this process is ``python -m paddlemix...`` (one of the package's command lines).

    The package's ``__init__`` runs before Paddle is imported in that case, so it can apply the
    settings the way the example scripts do; an application that merely imports paddlemix is
    left alone (its environment is its own business).
    """
    argv = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)[1:]
    i = 0
    while i < len(argv):  # the interpreter's own options, up to the script, -c or -m
        arg = argv[i]
        if arg == "-m":
            module = argv[i + 1] if i + 1 < len(argv) else ""
            return module == "paddlemix" or module.startswith("paddlemix.")
        if arg == "-c" or arg == "-" or not arg.startswith("-"):
            return False
        i += 2 if arg in ("-X", "-W") else 1
    return False


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
if __name__ == APPLY_RUN_NAME:
    apply_cpu_env()
