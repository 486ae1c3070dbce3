"""Run encoders exported by :mod:`paddlemix.export` with Paddle Inference.

::

    from paddlemix.inference import load_exported
    clip = load_exported("exported/ViT-B-32")            # CPU: oneDNN, all usable cores
    image_features = clip.encode_image(pixels)           # numpy [B, 3, H, W] float32 -> [B, D]
    text_features = clip.encode_text(token_ids, normalize=True)

Why a predictor and not the dynamic model: Paddle Inference runs the saved program with its
graph passes (fused linear + bias + activation, layer-norm and attention fusions on oneDNN) and
without Python in the loop, which is the fastest way Paddle has to run a fixed graph.

Choices made here, per device:

* CPU: Paddle's own CPU kernels (MKL GEMMs, the same ``addmm`` / attention kernels as the
  dynamic model, see :func:`paddlemix.kernels.dispatch.addmm_linear`) with its graph passes, and
  ``cpu_threads`` math threads (default: the CPUs this process may use, see
  :func:`paddlemix._env.available_cpus`). ``onednn=True`` runs oneDNN instead; it is opt-in
  because it was not faster on the AVX2 CPU the defaults were measured on (numbers: README,
  Performance). With oneDNN one fusion is turned off: ``matmul_elementwise_add_fuse_pass`` folds
  the text tower's causal-mask add into the attention matmul, and oneDNN then runs that matmul
  with a broadcast post-op on a reference path, orders of magnitude slower.
* GPU: TensorRT when this Paddle was built with it and ``tensorrt`` is not False (dynamic batch
  from 1 to ``max_batch_size``), plain GPU kernels otherwise; ``precision="fp16"`` asks for
  half precision on GPU. This GPU path is written against Paddle's documented API but has not
  been run here (no GPU on the development machine).

The predictors are not thread-safe: use one :class:`ExportedCLIP` per thread.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import paddle
import paddle.inference as paddle_infer

from .errors import PaddleMIXError
from ._env import available_cpus
from ._util import l2_normalize

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_CONFIG", "ExportedCLIP", "ExportError", "load_exported", "predictor_config"]

EXPORT_CONFIG = "export_config.json"
EXPORT_FORMAT = "paddlemix-inference"
DEVICES = ("cpu", "gpu")
PRECISIONS = ("fp32", "fp16", "bf16")
# See the module docstring: pathological on oneDNN for attention masks (onednn=True only).
CPU_PASSES_OFF = ("matmul_elementwise_add_fuse_pass",)

ArrayLike = Union[np.ndarray, paddle.Tensor, Sequence]


class ExportError(PaddleMIXError, ValueError):
    """An export directory that cannot be used, or inputs that do not fit it."""


def read_export_config(model_dir: Union[str, Path]) -> Dict[str, Any]:
    path = Path(model_dir) / EXPORT_CONFIG
    if not path.is_file():
        raise ExportError(
            f"{model_dir} is not a paddlemix export: {EXPORT_CONFIG} is missing "
            "(write one with `python -m paddlemix.export --model ... --out DIR`)"
        )
    cfg = json.loads(path.read_text())
    if cfg.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path} has format {cfg.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return cfg


def _tower_files(model_dir: Path, prefix: str) -> tuple:
    """(program, params) of a saved tower; Paddle 3 writes ``.json`` (PIR), older ``.pdmodel``."""
    params = model_dir / f"{prefix}.pdiparams"
    for suffix in (".json", ".pdmodel"):
        program = model_dir / f"{prefix}{suffix}"
        if program.is_file() and params.is_file():
            return program, params
    raise ExportError(f"{model_dir} lacks {prefix}.json (or .pdmodel) and {prefix}.pdiparams; re-run the export")


def _tensorrt_available() -> bool:
    return paddle.is_compiled_with_cuda() and tuple(paddle_infer.get_trt_compile_version()) != (0, 0, 0)


def predictor_config(
    program: Path,
    params: Path,
    input_spec: Dict[str, Any],
    device: str = "cpu",
    cpu_threads: Optional[int] = None,
    onednn: bool = False,
    tensorrt: Optional[bool] = None,
    precision: str = "fp32",
    max_batch_size: int = 64,
    gpu_memory_mb: int = 512,
    device_id: int = 0,
) -> paddle_infer.Config:
    """The ``paddle.inference.Config`` for one tower (see the module docstring for the choices)."""
    if device not in DEVICES:
        raise ExportError(f"device must be one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = paddle_infer.Config(str(program), str(params))
    config.disable_glog_info()
    config.switch_ir_optim(True)
    if device == "cpu":
        if precision == "fp16":
            raise ExportError("precision='fp16' needs device='gpu'; on CPU use 'fp32' (or 'bf16' with oneDNN)")
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(int(cpu_threads or available_cpus()))
        if onednn:
            config.enable_onednn()
            for name in CPU_PASSES_OFF:
                config.delete_pass(name)
            if precision == "bf16":
                config.enable_onednn_bfloat16()
        else:
            if precision == "bf16":
                raise ExportError("precision='bf16' on CPU needs onednn=True")
            config.disable_onednn()  # Paddle 3 enables oneDNN on CPU unless told otherwise
        return config
    if not paddle.is_compiled_with_cuda():
        raise ExportError("device='gpu' needs a CUDA build of Paddle (paddlepaddle-gpu); this one is CPU-only")
    half = precision in ("fp16", "bf16")
    config.enable_use_gpu(gpu_memory_mb, device_id,
                          paddle_infer.PrecisionType.Half if half else paddle_infer.PrecisionType.Float32)
    use_trt = _tensorrt_available() if tensorrt is None else tensorrt
    if use_trt:
        if not _tensorrt_available():
            raise ExportError("tensorrt=True but this Paddle build has no TensorRT")
        config.enable_tensorrt_engine(
            workspace_size=1 << 30,
            max_batch_size=max_batch_size,
            min_subgraph_size=3,
            precision_mode=paddle_infer.PrecisionType.Half if half else paddle_infer.PrecisionType.Float32,
            use_static=False,
            use_calib_mode=False,
        )
        batch, rest = input_spec["shape"][0], list(input_spec["shape"][1:])
        lo, hi = (batch, batch) if batch and batch > 0 else (1, max_batch_size)
        name = input_spec["name"]
        config.set_trt_dynamic_shape_info(
            {name: [lo] + rest}, {name: [hi] + rest}, {name: [min(hi, max(lo, 16))] + rest}
        )
    return config


class _Tower:
    """One predictor plus the input it was exported with."""

    def __init__(self, config: paddle_infer.Config, spec: Dict[str, Any], tower: str):
        self.spec = spec
        self.tower = tower
        self.predictor = paddle_infer.create_predictor(config)
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    def _check(self, x: np.ndarray) -> np.ndarray:
        shape = self.spec["shape"]
        x = np.ascontiguousarray(x, dtype=self.spec["dtype"])
        if x.ndim != len(shape) or any(s not in (-1, None) and s != d for s, d in zip(shape, x.shape)):
            raise ExportError(f"{self.tower} input of shape {list(x.shape)} does not fit the exported shape {shape} "
                              "(-1 is any size); re-export with another --batch-size or image size")
        return x

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.input.copy_from_cpu(self._check(x))
        self.predictor.run()
        return self.output.copy_to_cpu()


def _to_numpy(x: ArrayLike) -> np.ndarray:
    return x.numpy() if isinstance(x, paddle.Tensor) else np.asarray(x)


class ExportedCLIP:
    """The exported image and/or text encoder of a CLIP model, run by Paddle Inference.

    ``encode_image`` / ``encode_text`` take numpy arrays (or Paddle tensors) shaped as for the
    dynamic model and return numpy float32 features; ``normalize=True`` L2-normalises them
    (unless the export already did). Keyword arguments are those of :func:`predictor_config`.
    """

    def __init__(self, model_dir: Union[str, Path], towers: Optional[Sequence[str]] = None, **predictor_kwargs):
        self.model_dir = Path(model_dir)
        self.config = read_export_config(self.model_dir)
        available = self.config["towers"]
        wanted = list(available) if towers is None else list(towers)
        missing = [t for t in wanted if t not in available]
        if missing:
            raise ExportError(f"{self.model_dir} has no exported {missing} tower(s); it holds {sorted(available)}")
        self.normalized = bool(self.config.get("normalize", False))
        self._towers: Dict[str, _Tower] = {}
        for tower in wanted:
            spec = available[tower]
            program, params = _tower_files(self.model_dir, spec["prefix"])
            config = predictor_config(program, params, spec["input"], **predictor_kwargs)
            self._towers[tower] = _Tower(config, spec["input"], tower)

    @property
    def towers(self) -> Sequence[str]:
        return tuple(self._towers)

    @property
    def preprocess_cfg(self) -> Dict[str, Any]:
        return dict(self.config.get("preprocess_cfg", {}))

    def _encode(self, tower: str, x: ArrayLike, normalize: bool) -> np.ndarray:
        if tower not in self._towers:
            raise ExportError(f"the {tower} tower was not loaded; loaded: {self.towers}")
        out = self._towers[tower](_to_numpy(x))
        return l2_normalize(out) if normalize and not self.normalized else out

    def encode_image(self, images: ArrayLike, normalize: bool = False) -> np.ndarray:
        return self._encode("image", images, normalize)

    def encode_text(self, texts: ArrayLike, normalize: bool = False) -> np.ndarray:
        return self._encode("text", texts, normalize)


def load_exported(model_dir: Union[str, Path], **kwargs) -> ExportedCLIP:
    """:class:`ExportedCLIP` for ``model_dir`` (an ``--out`` directory of ``paddlemix.export``)."""
    return ExportedCLIP(model_dir, **kwargs)
