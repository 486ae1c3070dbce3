"""Ahead-of-time build of the `fused_ln` operator.

    python external_ops/setup.py install

installs the module `paddlemix_fused_ln`; `paddlemix.models.fused_norm` imports
it when present and otherwise JIT-builds the same sources into a cache. The
CUDA kernels are added only when the installed Paddle is built with CUDA.
"""
import sys
from pathlib import Path

import paddle
from paddle.utils.cpp_extension import CppExtension, CUDAExtension, setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_config  # noqa: E402  (lives next to this file)

with_cuda = paddle.is_compiled_with_cuda()
flags = build_config.extension_flags(with_cuda)
compile_args = {"cxx": flags["extra_cxx_cflags"], "nvcc": flags["extra_cuda_cflags"]}
extension_cls = CUDAExtension if with_cuda else CppExtension

setup(
    name=build_config.MODULE_NAME,
    ext_modules=extension_cls(
        sources=build_config.sources(with_cuda),
        extra_compile_args=compile_args,
        extra_link_args=flags["extra_ldflags"],
    ),
)
