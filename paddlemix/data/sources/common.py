"""Pieces shared by every training-data source: skip accounting, safe image decoding, sample building,
shard-pattern expansion and the split of shards between (rank, loader worker) readers.

Bad samples are the norm in web-scale image-text data (dead links saved as HTML, truncated JPEGs,
broken base64), so every source turns a bad sample into a counted skip instead of an exception, and a
``SkipCounter`` stops the run with a clear error once skips stop being rare: a high skip rate means the
data or its configuration is wrong, and training on the remainder would silently waste the run.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.context
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
from PIL import Image

from ...errors import PaddleMIXError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SKIP_REASONS",
    "SampleError",
    "SkipCounter",
    "SkippedTooManyError",
    "clean_caption",
    "decode_image",
    "expand_braces",
    "expand_shard_pattern",
    "make_sample",
    "reader_slot",
    "reseed_transform",
    "shuffle_buffer",
]

_logger = logging.getLogger(__name__)

# Why a sample can be skipped; fixed so that counters can live in shared memory across loader workers.
SKIP_REASONS: Tuple[str, ...] = (
    "missing_file",  # image or part/shard file not found or unreadable
    "corrupt_image",  # PIL cannot identify or decode it (truncated, not an image, ...)
    "too_large",  # more pixels than max_pixels (decompression-bomb guard)
    "too_small",  # a side below min_image_size
    "bad_base64",
    "bad_utf8",
    "bad_json",
    "bad_row",  # wrong number of columns / fields, no image field
    "missing_caption",  # no caption field or an empty one
    "missing_image",  # a webdataset sample with a caption but no image member
    "unsafe_path",  # tar member with an absolute or '..' path (never read)
    "bad_shard",  # a part/shard that cannot be read to its end (truncated tar, bad gzip)
)

# 64 Mpx: far above any training image (LAION/COCO are well under 4 Mpx after img2dataset) but decoding
# one costs ~200 MB, so a hostile file cannot exhaust a loader worker's memory.
DEFAULT_MAX_PIXELS = 1 << 26


class SampleError(PaddleMIXError):
    """A sample that must be skipped; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"Unknown skip reason {reason!r}; add it to SKIP_REASONS.")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkippedTooManyError(PaddleMIXError, RuntimeError):
    """Raised when the fraction of skipped samples passes ``max_skip_fraction``."""


class SkipCounter:
    """Counts good and skipped samples by reason, logs them, and enforces a maximum skip fraction.

    The counts live in shared memory created with the dataset, so loader worker processes (forked
    with a copy of the dataset) add to the same totals that the trainer reads in the main process;
    ``counts`` / ``seen`` / ``skipped`` are therefore totals over this process and its workers.
    Different ranks have separate counters (all-reduce them if you want a global number).

    Args:
        max_skip_fraction: stop with ``SkippedTooManyError`` once skipped / seen exceeds this...
        min_seen: ...after at least this many samples were seen, so a few early bad files in a
            small shard order do not abort a healthy run.
        log_every: a log line with the counts every this many samples seen by one process,
            when something was skipped since the last line.
        first_details: how many skips per reason (per process) are logged with their error
            message at WARNING level; later ones go to DEBUG.
        name: shown in log lines and errors (e.g. the dataset path).
    """

    def __init__(
            self,
            max_skip_fraction: float = 0.1,
            min_seen: int = 1000,
            log_every: int = 10000,
            first_details: int = 3,
            name: str = "dataset",
    ):
        if not 0.0 <= float(max_skip_fraction) <= 1.0:
            raise ValueError(f"max_skip_fraction={max_skip_fraction} must be in [0, 1] (e.g. 0.1).")
        if int(min_seen) < 1:
            raise ValueError(f"min_seen={min_seen} must be >= 1.")
        self.max_skip_fraction = float(max_skip_fraction)
        self.min_seen = int(min_seen)
        self.log_every = max(1, int(log_every))
        self.first_details = int(first_details)
        self.name = name
        # slot 0: good samples; slot 1 + i: skips of SKIP_REASONS[i]
        self._shared = multiprocessing.Array("q", 1 + len(SKIP_REASONS), lock=True)
        self._local_seen = 0
        self._last_logged_skipped = 0
        self._detail_logged: Dict[str, int] = {}

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # Pickled outside process creation (e.g. a deepcopy or a saved object): shared memory
            # cannot travel there, so the copy starts from a private snapshot of the totals.
            state["_shared"] = None
            state["_snapshot"] = list(self._shared[:])
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        snapshot = state.pop("_snapshot", None)
        self.__dict__.update(state)
        if self._shared is None:
            self._shared = multiprocessing.Array("q", 1 + len(SKIP_REASONS), lock=True)
            self._shared[:] = snapshot

    # -- reading ----------------------------------------------------------------------------------

    @property
    def counts(self) -> Dict[str, int]:
        """Skips by reason (only reasons that occurred)."""
        values = self._shared[:]
        return {reason: int(values[1 + i]) for i, reason in enumerate(SKIP_REASONS) if values[1 + i]}

    @property
    def good(self) -> int:
        return int(self._shared[0])

    @property
    def skipped(self) -> int:
        return int(sum(self._shared[1:]))

    @property
    def seen(self) -> int:
        return int(sum(self._shared[:]))

    @property
    def skip_fraction(self) -> float:
        seen = self.seen
        return self.skipped / seen if seen else 0.0

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items()) or "none"
        return (
            f"{self.name}: skipped {self.skipped} of {self.seen} samples "
            f"({100.0 * self.skip_fraction:.2f}%; {counts})"
        )

    def log_summary(self, level: int = logging.INFO) -> None:
        _logger.log(level, "%s", self.summary())
        self._last_logged_skipped = self.skipped

    def reset(self) -> None:
        with self._shared.get_lock():
            for i in range(len(self._shared)):
                self._shared[i] = 0

    # -- writing ----------------------------------------------------------------------------------

    def ok(self) -> None:
        with self._shared.get_lock():
            self._shared[0] += 1
        self._after_seen()

    def skip(self, reason: str, detail: str = "", check: bool = True) -> None:
        """Count one skipped sample; raises ``SkippedTooManyError`` past the threshold (if ``check``)."""
        index = SKIP_REASONS.index(reason)
        with self._shared.get_lock():
            self._shared[1 + index] += 1
        n = self._detail_logged.get(reason, 0)
        if n < self.first_details:
            self._detail_logged[reason] = n + 1
            _logger.warning("%s: skipping a sample (%s) %s", self.name, reason, detail)
        else:
            _logger.debug("%s: skipping a sample (%s) %s", self.name, reason, detail)
        self._after_seen()
        if check:
            self.check()

    def check(self) -> None:
        values = self._shared[:]
        seen, skipped = int(sum(values)), int(sum(values[1:]))
        if seen >= self.min_seen and skipped > self.max_skip_fraction * seen:
            message = (
                f"{self.summary()}: more than max_skip_fraction={self.max_skip_fraction} of the samples "
                f"are bad. Check the data paths and format (the first skips of each reason are logged "
                f"with their error), or raise max_skip_fraction if this data is known to be this dirty."
            )
            # Logged too: a loader worker's exception reaches the trainer wrapped in a generic error.
            _logger.error("%s", message)
            raise SkippedTooManyError(message)

    def _after_seen(self) -> None:
        self._local_seen += 1
        if self._local_seen % self.log_every == 0 and self.skipped != self._last_logged_skipped:
            self.log_summary()


# ---------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------

# What PIL raises on bad input: UnidentifiedImageError and truncation are OSError, some plugins raise
# SyntaxError/ValueError/EOFError on malformed headers, and zlib/struct errors surface as these too.
_PIL_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, Image.DecompressionBombError)
# A decodable image the transform cannot handle (e.g. a mode with no RGB conversion). Narrower than the
# decode errors, so that a bug in a custom transform surfaces at once instead of as skips.
_TRANSFORM_ERRORS = (OSError, ValueError)


def decode_image(
        source: Union[bytes, str],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_image_size: int = 1,
) -> Image.Image:
    """Open and fully decode an image from bytes or a path, or raise ``SampleError``.

    The pixel limit is checked on the header, before any pixel is decoded; PIL's own global
    ``Image.MAX_IMAGE_PIXELS`` check still applies on top (it is not modified).
    """
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except OSError as e:
        raise SampleError("missing_file", f"{source}: {e}") from None
    with fp:
        try:
            img = Image.open(fp)  # reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError("too_large", f"{width}x{height} pixels > max_pixels={max_pixels}")
            img.load()
        except Image.DecompressionBombError as e:
            raise SampleError("too_large", str(e)) from None
        except _PIL_DECODE_ERRORS as e:
            where = "" if isinstance(source, (bytes, bytearray)) else f"{source}: "
            raise SampleError("corrupt_image", f"{where}{type(e).__name__}: {e}") from None
    if min(width, height) < min_image_size:
        raise SampleError("too_small", f"{width}x{height} < min_image_size={min_image_size}")
    return img


def _encode_caption(tokenizer: Any, caption: str, context_length: Optional[int]) -> np.ndarray:
    if hasattr(tokenizer, "batch_encode"):
        ids = tokenizer.batch_encode([caption], context_length)
    else:
        ids = tokenizer([caption]) if context_length is None else tokenizer([caption], context_length=context_length)
    ids = np.asarray(ids, dtype=np.int64)
    return ids.reshape(-1) if ids.ndim == 1 else ids[0]


def make_sample(
        image: Image.Image,
        caption: str,
        transform: Callable[[Image.Image], np.ndarray],
        tokenizer: Any,
        context_length: Optional[int] = None,
        return_caption: bool = False,
) -> Dict[str, Any]:
    """The model-ready sample ``{"image": float32 CHW, "input_ids": int64 [L]}``.

    A transform failure on a decodable image (e.g. an exotic mode that cannot become RGB) is a bad
    sample, not a crash.
    """
    try:
        pixels = transform(image)
    except _TRANSFORM_ERRORS as e:
        raise SampleError("corrupt_image", f"transform failed: {type(e).__name__}: {e}") from None
    pixels = np.asarray(pixels, dtype=np.float32)
    sample = {"image": pixels, "input_ids": _encode_caption(tokenizer, caption, context_length)}
    if return_caption:
        sample["caption"] = caption
    return sample


def clean_caption(caption: Any) -> str:
    """A non-empty stripped caption or ``SampleError('missing_caption')``."""
    if not isinstance(caption, str) or not caption.strip():
        raise SampleError("missing_caption", f"caption={caption!r}")
    return caption.strip()


def reseed_transform(transform: Any, key: Sequence[int]) -> None:
    """Give every random step of ``transform`` a generator seeded from ``key``.

    Keyed by (seed, epoch, sample or reader), augmentation is reproducible across restarts and
    independent of which loader worker happens to process a sample, so resuming from a checkpoint
    replays exactly the crops of the uninterrupted run.
    """
    steps = list(getattr(transform, "steps", ()) or ())
    for step in [transform] + steps:
        set_rng = getattr(step, "set_rng", None)
        if callable(set_rng):
            set_rng(np.random.default_rng([int(k) for k in key]))


# ---------------------------------------------------------------------------------------------------
# Shard patterns
# ---------------------------------------------------------------------------------------------------

def _brace_alternatives(body: str) -> Optional[List[str]]:
    """The alternatives of one ``{...}`` body, or None when it is not an expansion (kept literally)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    if len(parts) > 1:
        return parts
    pieces = body.split("..")
    if len(pieces) in (2, 3) and all(p.lstrip("-").isdigit() for p in pieces):
        first, last = int(pieces[0]), int(pieces[1])
        step = abs(int(pieces[2])) if len(pieces) == 3 else 1
        if step == 0:
            raise ValueError(f"Brace range {{{body}}} has step 0; use a positive step.")
        # Zero padding as in bash: a bound written with a leading zero pads to the widest bound.
        padded = any(len(p.lstrip("-")) > 1 and p.lstrip("-").startswith("0") for p in pieces[:2])
        width = max(len(pieces[0]), len(pieces[1])) if padded else 0
        direction = 1 if last >= first else -1
        return [f"{n:0{width}d}" for n in range(first, last + direction, step * direction)]
    return None


def expand_braces(pattern: str) -> List[str]:
    """Bash-style brace expansion: ``a{0..2}b`` -> a0b a1b a2b, ``{x,y}{00..01}`` -> x00 x01 y00 y01.

    Supports comma lists, numeric ranges with optional step and zero padding, nesting and several
    groups; a ``{...}`` that is neither a list nor a range is kept literally, as bash does.
    """
    depth, start = 0, -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                prefix, body, suffix = pattern[:start], pattern[start + 1:i], pattern[i + 1:]
                tails = expand_braces(suffix)
                alternatives = _brace_alternatives(body)
                if alternatives is None:
                    heads = [prefix + "{" + b + "}" for b in expand_braces(body)]
                else:
                    heads = [prefix + a for alt in alternatives for a in expand_braces(alt)]
                return [h + t for h in heads for t in tails]
    if depth != 0:
        raise ValueError(f"Unbalanced braces in shard pattern {pattern!r}.")
    return [pattern]


def expand_shard_pattern(pattern: str) -> List[str]:
    """Shard list of ``a/{000..009}.tar``, several patterns joined by ``::`` (open_clip's syntax)."""
    urls: List[str] = []
    for piece in pattern.split("::"):
        piece = piece.strip()
        if piece:
            urls.extend(expand_braces(piece))
    if not urls:
        raise ValueError(f"Shard pattern {pattern!r} names no shard.")
    return urls


# ---------------------------------------------------------------------------------------------------
# Readers: which (rank, worker) reads what
# ---------------------------------------------------------------------------------------------------

def reader_slot(rank: int, world_size: int) -> Tuple[int, int]:
    """(reader id, number of readers) of the calling process: rank-major over loader workers."""
    import paddle.io

    info = paddle.io.get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * num_workers + worker, world_size * num_workers


T = TypeVar("T")


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Approximate shuffle of a stream with a buffer of ``size`` items (<= 1: no shuffle)."""
    if size <= 1:
        yield from items
        return
    buffer: List[T] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
