"""Single description of how the `fused_ln` operator is built.

Both build routes read it: `python -m paddlemix.kernels build` (into the extension
cache) and `python external_ops/setup.py install` (the module into the environment),
which loads this file by path. Keeping the source list and flags in one place means the
two routes cannot drift, and the cache key (`source_digest`) covers exactly what goes
into the binary. Standard library only: setup.py runs it without importing paddlemix.
"""
from __future__ import annotations

import hashlib
import importlib.util
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional

OP_NAME = "fused_ln"
# Name of the installed Python module / shared library.
MODULE_NAME = "paddlemix_fused_ln"

# The sources ship inside the package, so an installed wheel can build its kernels too.
KERNEL_DIR = Path(__file__).resolve().parent / "csrc"

CPU_SOURCES = ("fused_ln_op.cc", "fused_ln_cpu.cc", "cpu_act_op.cc")
CUDA_SOURCES = ("fused_ln_op.cu",)
HEADERS = ("fused_ln_cpu.h", "fused_ln_cpu_rows.inc", "fused_ln_cuda.cuh", "cpu_act_rows.inc", "simd_vec.h")

# GPU architectures are named explicitly so no GPU is needed at build time:
# sm_80 (A100 / A800 / RTX 30xx class) and sm_90 (H100 / H200), plus PTX for
# sm_90 so newer devices can JIT from it.
CUDA_ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)

# -g0 overrides the -g that distutils adds (halves compile time, the binary is
# for speed); -fopenmp for the row loops. -ffp-contract=off keeps the compiler
# from fusing a*b - c into one FMA in some places and not others: the backward
# pass relies on g = dy * w being rounded identically in both of its passes
# (the kernels spell out the FMAs they want). No -mavx2: the AVX2 and AVX-512 kernels
# are selected by CPUID at run time, so the binary runs on any x86-64.
CXX_FLAGS = ("-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-I" + str(KERNEL_DIR))
NVCC_FLAGS = ("-O3", "-std=c++17", "-I" + str(KERNEL_DIR)) + CUDA_ARCH_FLAGS


def _paddle_intel_openmp() -> Optional[Path]:
    """The Intel OpenMP runtime that Paddle's x86 wheels bundle for MKL, found without importing Paddle."""
    spec = importlib.util.find_spec("paddle")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(list(spec.submodule_search_locations)[0]) / "libs" / "libiomp5.so"
    return lib if lib.is_file() else None


def link_flags() -> List[str]:
    """Run the kernels' parallel loops on the OpenMP runtime MKL already uses, where Paddle ships it.

    Compiled with GCC's ``-fopenmp``, the loops call the ``GOMP_*`` entry points, which Intel's
    runtime also provides. Linked against it instead of GNU's libgomp, the process keeps one
    thread pool: the kernels' loops start on the threads MKL's GEMMs just used (no wake-up per
    call) and never compete with them for the cores. The loops use only entry points both
    runtimes have (``schedule(monotonic: dynamic)``, not OpenMP 4.5's nonmonotonic default).
    Without a bundled runtime (other platforms), GNU's.
    """
    iomp = _paddle_intel_openmp()
    if iomp is None:
        return ["-fopenmp"]
    flags = [f"-L{iomp.parent}", "-liomp5", f"-Wl,-rpath,{iomp.parent}"]
    return flags + (["-lmklml_intel"] if has_cblas() else [])


def has_cblas() -> bool:
    """Whether Paddle bundles MKL (its x86 wheels do), whose ``cblas_sgemm`` the attention operator calls.

    Where it does not, the library is built without ``cpu_attention`` and the dispatch keeps the
    separate operators.
    """
    iomp = _paddle_intel_openmp()
    return iomp is not None and (iomp.parent / "libmklml_intel.so").is_file()


def cxx_flags() -> List[str]:
    return list(CXX_FLAGS) + (["-DPADDLEMIX_CBLAS=1"] if has_cblas() else [])


def sources(with_cuda: bool) -> List[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(KERNEL_DIR / name) for name in names]


def extension_flags(with_cuda: bool) -> Dict[str, List[str]]:
    """Keyword arguments shared by `paddle.utils.cpp_extension.load` and `setup`."""
    return {
        "extra_cxx_cflags": cxx_flags(),
        "extra_cuda_cflags": list(NVCC_FLAGS) if with_cuda else [],
        "extra_ldflags": link_flags(),
    }


def missing_files(with_cuda: bool) -> List[str]:
    wanted = [KERNEL_DIR / n for n in CPU_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else ())]
    return [str(p) for p in wanted if not p.is_file()]


def source_digest(with_cuda: bool, paddle_version: str) -> str:
    """Hash of everything that determines the binary: sources, headers, flags, toolchain ABI."""
    h = hashlib.sha256()
    for name in sorted(CPU_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else ())):
        h.update(name.encode())
        h.update((KERNEL_DIR / name).read_bytes())
    h.update(Path(__file__).read_bytes())
    h.update(repr((with_cuda, paddle_version, sys.version_info[:2], platform.machine(), link_flags())).encode())
    return h.hexdigest()[:16]
