"""Batch embeddings from the command line or Python (the embedding API asked for in PaddleMIX #1087).

    python -m paddlemix.embed --model ViT-B-32 --pretrained w.safetensors --images photos/ --out img.npy
    python -m paddlemix.embed --model ViT-B-32 --pretrained w.safetensors --texts captions.txt --out txt.npy

``--images``: every image under the folder (recursive), in sorted relative-path order; the order is
written next to the array as ``<out stem>.files.txt``. ``--texts``: one text per line, row i is line
i + 1. The array is float32 [N, embed_dim], exactly ``encode_image`` / ``encode_text`` of the model
(L2-normalised with ``--normalize``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .eval.common import PRECISIONS, atomic_write, encode_images, encode_texts
from .eval.datasets import ImageListDataset, read_lines

logger = logging.getLogger("paddlemix.embed")

__all__ = ["embed_images", "embed_texts", "main"]

PathLike = Union[str, os.PathLike]


def embed_images(
    model,
    preprocess,
    folder: PathLike,
    *,
    batch_size: int = 32,
    num_workers: int = 2,
    precision: str = "fp32",
    normalize: bool = False,
    progress: bool = True,
) -> Tuple[np.ndarray, List[str]]:
    """``(features [N, D] float32, relative paths)`` for every image under ``folder``.

    ``preprocess`` should return numpy (``image_transform(..., output='numpy')``) when
    ``num_workers > 0``.
    """
    dataset = ImageListDataset(folder, preprocess)
    feats, _ = encode_images(model, dataset, np.arange(len(dataset)), batch_size=batch_size, num_workers=num_workers,
                             precision=precision, normalize=normalize, progress=progress, desc="embed images")
    return feats, list(dataset.files)


def embed_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    normalize: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Text features [len(texts), D] float32, in input order."""
    return encode_texts(model, tokenizer, list(texts), batch_size=batch_size, precision=precision,
                        normalize=normalize, progress=progress, desc="embed texts")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m paddlemix.embed", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="registered model name, open_clip config JSON, or model directory")
    p.add_argument("--pretrained", default=None, help="weights file or directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="embed every image under DIR (recursive, sorted)")
    src.add_argument("--texts", metavar="FILE", help="embed each line of FILE (UTF-8)")
    p.add_argument("--out", required=True, metavar="X.npy", help="output array, float32 [N, embed_dim]")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp16/bf16: autocast (GPU only)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    p.add_argument("--force-quick-gelu", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise SystemExit(f"--out {out} must end in .npy (np.save appends it otherwise and the name would not match)")
    from .factory import create_model_and_transforms, get_tokenizer

    model, _, preprocess = create_model_and_transforms(args.model, args.pretrained, force_quick_gelu=args.force_quick_gelu)
    common = dict(batch_size=args.batch_size, precision=args.precision, normalize=args.normalize,
                  progress=not args.no_progress)
    if args.images:
        preprocess.output = "numpy"
        feats, files = embed_images(model, preprocess, args.images, num_workers=args.num_workers, **common)
        listing = out.with_name(out.stem + ".files.txt")
        atomic_write(listing, lambda f: f.write("".join(name + "\n" for name in files).encode("utf-8")))
        logger.info("image order written to %s", listing)
    else:
        texts = read_lines(args.texts, "texts")
        feats = embed_texts(model, get_tokenizer(model), texts, **common)
    atomic_write(out, lambda f: np.save(f, feats.astype(np.float32)))
    logger.info("wrote %s: float32 %s", out, list(feats.shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
