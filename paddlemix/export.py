"""Export the image and text encoders of a CLIP-family model for Paddle Inference.

::

    python -m paddlemix.export --model ViT-B-32 --pretrained weights.safetensors --out exported/ViT-B-32

writes, for each tower, ``image.json`` / ``text.json`` (the PIR program) with ``.pdiparams``
(the weights), and ``export_config.json`` (input shapes, model config, preprocessing and the
parity check's result). The batch dimension is dynamic unless ``--batch-size`` fixes it;
image size and context length are those of the model. :mod:`paddlemix.inference` loads the
directory. After saving, the exported encoders are run by Paddle Inference on generated
inputs and compared with the dynamic model; the command fails when they differ by more
than ``--atol``.

One thing differs from the dynamic model, not in its numbers: the fused LayerNorm custom
operator is traced as Paddle's own ``layer_norm`` (same math; an exported program must load
without the operator's library). A graph built on a CPU keeps the towers' CPU formulations
(``addmm`` with the bias inside the GEMM, einsum attention layouts), which Paddle Inference
runs faster than what its passes make of the generic ones; built on a GPU it keeps
``scaled_dot_product_attention``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import paddle
import paddle.nn as nn

from .inference import EXPORT_CONFIG, EXPORT_FORMAT, ExportedCLIP
from .models.clip_model import CLIP

logger = logging.getLogger(__name__)

__all__ = ["TOWERS", "check_parity", "export_encoders", "input_specs", "main", "parity_inputs"]

TOWERS = ("image", "text")


class _ImageEncoder(nn.Layer):
    def __init__(self, model: CLIP, normalize: bool):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, image: paddle.Tensor) -> paddle.Tensor:
        return self.model.encode_image(image, normalize=self.normalize)


class _TextEncoder(nn.Layer):
    def __init__(self, model: CLIP, normalize: bool):
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, text: paddle.Tensor) -> paddle.Tensor:
        return self.model.encode_text(text, normalize=self.normalize)


@contextlib.contextmanager
def _reference_norms(model: nn.Layer) -> Iterator[None]:
    """Trace fused norm layers (``use_op``) through their reference math; restored afterwards."""
    fused = [layer for layer in model.sublayers(include_self=True) if getattr(layer, "use_op", False)]
    for layer in fused:
        layer.use_op = False
    try:
        yield
    finally:
        for layer in fused:
            layer.use_op = True


def input_specs(model: CLIP, batch_size: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """Name, shape (-1: any) and dtype of each tower's input."""
    batch = -1 if batch_size is None else int(batch_size)
    if batch != -1 and batch < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for a dynamic batch), got {batch_size}")
    height, width = model.image_size
    return {
        "image": {"name": "image", "shape": [batch, 3, int(height), int(width)], "dtype": "float32"},
        "text": {"name": "text", "shape": [batch, int(model.context_length)], "dtype": "int64"},
    }


def _check_towers(towers: Sequence[str]) -> List[str]:
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {list(towers)}")
    return list(dict.fromkeys(towers))


def export_encoders(
    model: CLIP,
    out_dir: Union[str, Path],
    towers: Sequence[str] = TOWERS,
    batch_size: Optional[int] = None,
    normalize: bool = False,
    preprocess_cfg: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save ``towers`` of ``model`` under ``out_dir`` with ``paddle.jit.save``; returns ``out_dir``.

    ``normalize`` bakes the L2 normalisation into the exported program.
    """
    towers = _check_towers(towers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = input_specs(model, batch_size)
    wrappers = {"image": _ImageEncoder, "text": _TextEncoder}
    was_training = model.training
    model.eval()
    entries = {}
    try:
        with _reference_norms(model):
            for tower in towers:
                spec = specs[tower]
                layer = wrappers[tower](model, normalize)
                static = paddle.jit.to_static(
                    layer,
                    input_spec=[paddle.static.InputSpec(spec["shape"], spec["dtype"], spec["name"])],
                    full_graph=True,
                )
                paddle.jit.save(static, str(out / tower))
                entries[tower] = {"prefix": tower, "input": spec}
                logger.info("exported the %s encoder to %s", tower, out / tower)
    finally:
        if was_training:
            model.train()
    config = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "towers": entries,
        "normalize": bool(normalize),
        "embed_dim": int(model.config.embed_dim),
        "model_cfg": model.config.to_model_cfg(),
        "preprocess_cfg": _jsonable(preprocess_cfg or {}),
        "paddle_version": paddle.__version__,
    }
    (out / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def parity_inputs(model: CLIP, batch: int = 2, seed: int = 0) -> Dict[str, np.ndarray]:
    """Generated images and token ids: each text ends in the vocabulary's largest id (EOT)."""
    rng = np.random.default_rng(seed)
    height, width = model.image_size
    images = rng.standard_normal([batch, 3, int(height), int(width)]).astype(np.float32)
    vocab, length = int(model.config.text.vocab_size), int(model.context_length)
    texts = rng.integers(1, vocab - 1, size=[batch, length]).astype(np.int64)
    ends = rng.integers(1, length, size=batch)
    for row, end in enumerate(ends):
        texts[row, end] = vocab - 1
        texts[row, end + 1:] = 0
    return {"image": images, "text": texts}


def check_parity(
    model: CLIP,
    out_dir: Union[str, Path],
    batch: int = 2,
    seed: int = 0,
    **predictor_kwargs,
) -> Dict[str, float]:
    """Max absolute difference, per exported tower, between Paddle Inference and ``model``."""
    exported = ExportedCLIP(out_dir, **predictor_kwargs)
    fixed = exported.config["towers"][exported.towers[0]]["input"]["shape"][0]
    inputs = parity_inputs(model, batch=fixed if fixed > 0 else batch, seed=seed)
    normalize = exported.normalized
    was_training = model.training
    model.eval()
    diffs = {}
    try:
        with paddle.no_grad():
            for tower in exported.towers:
                x = paddle.to_tensor(inputs[tower])
                if tower == "image":
                    ref, got = model.encode_image(x, normalize=normalize), exported.encode_image(inputs[tower])
                else:
                    ref, got = model.encode_text(x, normalize=normalize), exported.encode_text(inputs[tower])
                diffs[tower] = float(np.abs(ref.astype("float32").numpy() - got.astype(np.float32)).max())
    finally:
        if was_training:
            model.train()
    return diffs


def _record_parity(out_dir: Path, diffs: Dict[str, float], atol: float) -> None:
    path = out_dir / EXPORT_CONFIG
    config = json.loads(path.read_text())
    config["parity"] = {"max_abs_diff": diffs, "atol": atol, "device": "cpu"}
    path.write_text(json.dumps(config, indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paddlemix.export",
        description="Export the image and text encoders of a CLIP-family model for Paddle Inference.",
    )
    parser.add_argument("--model", required=True, help="registered name, model-config JSON, or model directory")
    parser.add_argument("--pretrained", default=None, help="weights file or directory (random weights without it)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--towers", nargs="+", default=list(TOWERS), choices=TOWERS)
    parser.add_argument("--batch-size", type=int, default=None, help="fix the batch size (default: dynamic)")
    parser.add_argument("--normalize", action="store_true", help="export L2-normalised features")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed |exported - dynamic| on the parity inputs (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check against the dynamic model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from .factory import create_model, get_model_preprocess_cfg

    model = create_model(args.model, pretrained=args.pretrained)
    if model.weights_source is None:
        logger.warning("no --pretrained given and %s holds no weights: exporting randomly initialised weights",
                       args.model)
    out = export_encoders(model, args.out, towers=args.towers, batch_size=args.batch_size,
                          normalize=args.normalize, preprocess_cfg=get_model_preprocess_cfg(model))
    if args.no_check:
        logger.info("wrote %s (parity check skipped)", out)
        return 0
    diffs = check_parity(model, out)
    _record_parity(out, diffs, args.atol)
    worst = max(diffs.values())
    for tower, diff in diffs.items():
        logger.info("%s encoder: max |exported - dynamic| = %.3g", tower, diff)
    if worst > args.atol:
        logger.error("parity check failed: %.3g > --atol %.3g; the export in %s does not match the model",
                     worst, args.atol, out)
        return 1
    logger.info("wrote %s; exported encoders match the dynamic model within %.3g", out, args.atol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
