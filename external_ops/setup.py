"""Ahead-of-time build of paddlemix's kernel library as an installed module.

    python external_ops/setup.py install

installs the module `paddlemix_fused_ln` into the active environment, which
`paddlemix.kernels` loads before looking in its extension cache. The other
route, which also works from an installed wheel, is `python -m paddlemix.kernels build`.
The sources and flags live in paddlemix/kernels/ (they ship with the package);
this file reads build_config.py there by path, without importing paddlemix.
The CUDA kernels are added only when the installed Paddle is built with CUDA.
"""
import importlib.util
from pathlib import Path

import paddle
from paddle.utils.cpp_extension import CppExtension, CUDAExtension, setup

_CONFIG = Path(__file__).resolve().parents[1] / "paddlemix" / "kernels" / "build_config.py"
_spec = importlib.util.spec_from_file_location("paddlemix_kernels_build_config", _CONFIG)
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)

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
