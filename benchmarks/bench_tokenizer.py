"""Throughput of the CLIP tokenizer on generated captions.

Prints captions/s for paddlemix's tokenizer on a cold cache (new tokenizer, first pass) and a warm cache
(second pass over the same captions), and open_clip's rate in the same run when open_clip is importable.

    python benchmarks/bench_tokenizer.py --num-captions 10000
"""
import argparse
import logging
import random
import time
from typing import Callable, List

from paddlemix.data.tokenizer import SimpleTokenizer

_logger = logging.getLogger("bench_tokenizer")

_WORDS = (
    "a an the photo picture image of with on in at by near two three small large red blue green "
    "dog dogs cat cats bird car cars bus street tree trees man woman people child playing sitting "
    "standing running holding table kitchen beach mountain snow water river city building sign "
    "colorful vintage close-up aerial view black-and-white wooden old new bright dark night sunset"
).split()
# Some captions carry non-ASCII text or HTML entities, so the ftfy path is part of the measurement.
_EXTRAS = ("café", "naïve", "über", "&amp;", "日本", "🐱", "don't", "it's", "#1", "3.5", "—")


def make_captions(n: int, seed: int = 0, extra_fraction: float = 0.2) -> List[str]:
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 20))]
        if rng.random() < extra_fraction:
            words.insert(rng.randrange(len(words) + 1), rng.choice(_EXTRAS))
        caption = " ".join(words)
        captions.append(caption[0].upper() + caption[1:] + ".")
    return captions


def rate(fn: Callable[[List[str]], object], captions: List[str], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(captions), batch_size):
        fn(captions[i:i + batch_size])
    return len(captions) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-captions", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    captions = make_captions(args.num_captions, seed=args.seed)
    start = time.perf_counter()
    tokenizer = SimpleTokenizer(context_length=args.context_length)
    _logger.info("paddlemix build: %.3f s", time.perf_counter() - start)
    encode = lambda batch: tokenizer.batch_encode(batch, args.context_length)  # noqa: E731
    _logger.info("paddlemix batch_encode (numpy), cold cache: %.0f captions/s", rate(encode, captions, args.batch_size))
    _logger.info("paddlemix batch_encode (numpy), warm cache: %.0f captions/s", rate(encode, captions, args.batch_size))
    call = lambda batch: tokenizer(batch, args.context_length)  # noqa: E731
    _logger.info("paddlemix __call__ (paddle.Tensor), warm cache: %.0f captions/s", rate(call, captions, args.batch_size))

    try:
        import open_clip
    except ImportError:
        _logger.info("open_clip: peer absent (not importable in this environment)")
        return
    reference = open_clip.tokenizer.SimpleTokenizer()
    ref_call = lambda batch: reference(batch, args.context_length)  # noqa: E731
    _logger.info("open_clip %s SimpleTokenizer, cold cache: %.0f captions/s",
                 open_clip.__version__, rate(ref_call, captions, args.batch_size))
    _logger.info("open_clip %s SimpleTokenizer, warm cache: %.0f captions/s",
                 open_clip.__version__, rate(ref_call, captions, args.batch_size))


if __name__ == "__main__":
    main()
