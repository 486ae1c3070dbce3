"""Smoke-run the public API end to end on generated inputs: build, preprocess, tokenize, encode.

    python examples/clip/run_demo.py [--model ViT-B-32]

Weights are random unless --pretrained names a checkpoint (no downloads happen here).
"""
import argparse
import logging
import runpy
import time
from pathlib import Path

# paddlemix/_env.py before anything imports Paddle: MKL's AVX2 path on AMD CPUs, all cores, and
# the other CPU settings documented there (README, "Performance").
runpy.run_path(str(Path(__file__).resolve().parents[2] / "paddlemix" / "_env.py"), run_name="paddlemix_apply_cpu_env")

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from PIL import Image  # noqa: E402

import paddlemix  # noqa: E402

logger = logging.getLogger("run_demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model, _, preprocess = paddlemix.create_model_and_transforms(args.model, pretrained=args.pretrained)
    tokenizer = paddlemix.get_tokenizer(args.model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) for _ in range(4)]
    pixels = paddle.stack([preprocess(im) for im in images])
    texts = tokenizer(["a photo of a cat", "a diagram", "noise", "a red square"])
    start = time.perf_counter()
    with paddlemix.inference_mode(model):
        logits_per_image, _ = model.get_logits(pixels, texts)
    probs = paddle.nn.functional.softmax(logits_per_image, axis=-1).numpy()
    logger.info("%s: %d parameters, image batch %s, %.2f s", args.model,
                sum(int(np.prod(p.shape)) for p in model.parameters()), pixels.shape, time.perf_counter() - start)
    logger.info("image-text probabilities:\n%s", np.array2string(probs, precision=3))


if __name__ == "__main__":
    main()
