"""``python -m paddlemix.convert``: turn a released checkpoint into a paddlemix model directory.

    python -m paddlemix.convert --src open_clip_pytorch_model.bin --model ViT-B-32 --out vit-b-32 --dtype fp16

``--src`` is a weights file or directory in open_clip, EVA-CLIP, CLIPA, HF transformers,
PaddleMIX or paddlemix layout (read without torch and without running pickled code).
``--model`` names the architecture, resolved as ``create_model`` resolves names but never
downloading (:mod:`paddlemix.zoo.resolve`): a zoo name (which also gives the preprocessing;
``paddlemix:<name>`` for the EVA-CLIP names that are architecture names too), an architecture from
``paddlemix.list_models()``, or a config JSON (open_clip, open_clip_config.json, PaddleMIX, HF);
it may be left out when ``--src`` is a directory with its config.

The output (``config.json`` with ``preprocess_cfg``, ``model.safetensors``, ``manifest.json``
with sha256 of each file) is verified before it is moved into place: the source is built in
Paddle from the original checkpoint and both run on the same inputs; when torch and open_clip
happen to be importable, an open_clip-layout source is also run by open_clip itself. A report
is printed as JSON; the exit status is non-zero when conversion or verification fails.

``--to paddlemix`` writes the way back instead: PaddleMIX's own directory (``config.json`` in the
schema of its ``CLIPConfig`` / ``EVACLIPConfig`` + ``model_state.pdparams`` under its names), which
PaddleMIX's ``from_pretrained`` reads; it is read back through the PaddleMIX converter and must
give the same bits. Where PaddleMIX computes differently from the source's semantics (its vision
tower ignores quick_gelu, its mean pooling includes the class token), the report lists it::

    python -m paddlemix.convert --src my-finetuned-dir --out for-paddlemix --to paddlemix
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from .errors import PaddleMIXError
from .zoo.checkpoint import iter_checkpoint_shards, load_state_dict
from .zoo.key_maps import convert_state_dict, widen_bf16_bits
from .zoo.legacy import LEGACY_WEIGHTS_NAME, paddlemix_differences, write_paddlemix_dir
from .zoo.model_dir import DTYPES, convert_weights, parse_size, read_manifest, source_check, write_model_dir
from .zoo.resolve import resolve

logger = logging.getLogger("paddlemix.convert")

LAYOUTS = ("auto", "open_clip", "eva", "hf", "paddlemix", "paddlemix_legacy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m paddlemix.convert",
        description="Convert an open_clip / EVA-CLIP / CLIPA / HF / PaddleMIX checkpoint into a paddlemix model "
        "directory (config.json + model.safetensors + manifest.json) and verify it.",
    )
    parser.add_argument("--src", required=True, help="checkpoint file or directory")
    parser.add_argument("--model", help="zoo name, architecture name, or config JSON; default: the config in --src")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--to", choices=("safetensors", "paddlemix"), default="safetensors",
                        help="safetensors: this project's directory (config.json + model.safetensors + manifest.json); "
                        "paddlemix: PaddleMIX's own (its config.json schema + model_state.pdparams), which its "
                        "CLIP / EVACLIP.from_pretrained read")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="weight precision stored (default fp16; keep for --to paddlemix)")
    parser.add_argument("--max-shard-size", type=parse_size, metavar="SIZE",
                        help="split the weights into safetensors shards of at most SIZE (e.g. 5GB) behind an index")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="key layout of --src (default: detect)")
    parser.add_argument("--mean", type=float, nargs=3, help="override the normalisation mean stored in preprocess_cfg")
    parser.add_argument("--std", type=float, nargs=3, help="override the normalisation std")
    parser.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"), help="override the resize filter")
    parser.add_argument("--resize-mode", choices=("shortest", "longest", "squash"), help="override the resize mode")
    parser.add_argument("--torch", choices=("auto", "off", "require"), default="auto", dest="use_torch",
                        help="also compare with open_clip in torch: when importable (auto), never, or fail without it")
    parser.add_argument("--no-verify", action="store_true", help="skip running the source and the copy")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def _model_cfg(args: argparse.Namespace) -> Dict[str, Any]:
    target = args.model if args.model is not None else args.src
    if args.model is None and not Path(args.src).is_dir():
        raise SystemExit("--model is required when --src is a file (a zoo name, an architecture, or a config JSON)")
    cfg = resolve(target, download=False).model_cfg
    preprocess = dict(cfg.get("preprocess_cfg") or {})
    overrides = {"mean": args.mean, "std": args.std, "interpolation": args.interpolation,
                 "resize_mode": args.resize_mode}
    preprocess.update({k: v for k, v in overrides.items() if v is not None})
    if not {"mean", "std"} <= set(preprocess):
        logger.warning("no preprocessing is known for %s; the model will use OpenAI's mean/std, bicubic, "
                       "shortest-side resize unless you pass --mean/--std/--interpolation/--resize-mode", target)
    cfg["preprocess_cfg"] = preprocess
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise SystemExit(f"--src {src} does not exist")
    cfg = _model_cfg(args)
    layout = None if args.layout == "auto" else args.layout
    if args.to == "paddlemix":
        return _to_paddlemix(src, out, cfg, args.dtype or "keep", layout, args.overwrite)
    args.dtype = args.dtype or "fp16"
    check = None if args.no_verify else source_check(src, cfg, args.dtype, layout, args.use_torch)
    start = time.perf_counter()
    try:
        write_model_dir(src, cfg, out, dtype=args.dtype, layout=layout, overwrite=args.overwrite, check=check,
                        max_shard_size=args.max_shard_size,
                        source={"path": str(src.resolve()), "model": args.model or str(src)})
    except (PaddleMIXError, FileExistsError, RuntimeError) as e:
        logger.error("%s; nothing was written to %s", e, out)
        return 1
    manifest = read_manifest(out)
    report = {"out": str(out), "seconds": round(time.perf_counter() - start, 3), **manifest}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def _to_paddlemix(src: Path, out: Path, cfg: Dict[str, Any], dtype: str, layout: Optional[str], overwrite: bool) -> int:
    """Write PaddleMIX's layout, then read it back through the PaddleMIX converter: it must give the same bits."""
    start = time.perf_counter()
    try:
        tensors, _, layout = convert_weights(iter_checkpoint_shards(src), cfg, dtype, layout, str(src))
        # PaddleMIX's format is one pickle: its writer needs every array in memory anyway.
        tensors = {name: np.asarray(value) for name, value in tensors.items()}
        write_paddlemix_dir(tensors, cfg, out, overwrite=overwrite)
    except (PaddleMIXError, FileExistsError) as e:
        logger.error("%s; nothing was written to %s", e, out)
        return 1
    back = convert_state_dict(load_state_dict(out / LEGACY_WEIGHTS_NAME), "paddlemix_legacy")
    bad = sorted(k for k in tensors if k not in back or not np.array_equal(back[k], widen_bf16_bits(tensors[k])))
    if bad or set(back) != set(tensors):
        logger.error("%s does not read back to the same weights: %s", out, bad[:10] or sorted(set(back) ^ set(tensors)))
        return 1
    report = {"out": str(out), "to": "paddlemix", "layout": layout, "tensors": len(tensors), "round_trip": "bit-exact",
              "paddlemix_differences": paddlemix_differences(cfg), "seconds": round(time.perf_counter() - start, 3)}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
