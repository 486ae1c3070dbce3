"""Byte-level BPE tokenizer of OpenAI CLIP.

The ids produced here must be bit-identical to ``open_clip.tokenize`` (and OpenAI ``clip.tokenize``):
text encoders pool at the end-of-text position and were trained on exactly these ids, so any
divergence (a different text clean-up, a different merge order, a different truncation rule) silently
changes zero-shot accuracy instead of failing loudly.

Pipeline for one caption:

1. clean: ``ftfy.fix_text`` (repairs mojibake), ``html.unescape`` twice (captions scraped from the web
   are often double-escaped), collapse whitespace, lower-case;
2. pre-tokenize with CLIP's regex (contractions, letter runs, single digits, punctuation runs);
3. map every UTF-8 byte of a word to a printable unicode character, run the BPE merges, look up ids;
4. wrap in ``<start_of_text>`` / ``<end_of_text>``, zero-pad, and on overflow truncate while keeping
   ``<end_of_text>`` at the last position (the pooled position must always exist).

Speed: step 3 is memoised per word in a bounded LRU cache, and plain printable ASCII captions skip
``ftfy`` (which is the slowest step and provably a no-op on such text, see ``_needs_ftfy``).
"""
import functools
import gzip
import html
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import paddle
import regex

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "SimpleTokenizer",
    "bytes_to_unicode",
    "clean_text",
    "default_bpe_path",
    "default_tokenizer",
    "tokenize",
]

_logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"

# The merges file holds 262,143 merges; CLIP uses only the first 49152 - 256 - 2 of them so that
# 256 byte symbols + 256 word-final byte symbols + merges + 2 special tokens = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2

# Control characters (other than \t \n \x0c \r) are rewritten by ftfy, and '&' may start an HTML
# entity, so only text free of both can skip the ftfy / html clean-up.
_FTFY_SENSITIVE_ASCII = regex.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f&]")


def default_bpe_path() -> str:
    """Path of the merges file shipped inside the package (OpenAI's MIT-licensed CLIP vocabulary)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """Map each byte value to a printable unicode character.

    BPE works on strings; mapping bytes (rather than code points) keeps the vocabulary at 256 base
    symbols while still covering every possible UTF-8 input. Bytes that are printable Latin-1 map to
    themselves; the remaining 68 (controls, space, soft hyphen, ...) are shifted to 256 + k in byte
    order so that no base symbol is whitespace.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable.update(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable.update(range(ord("\u00ae"), ord("\u00ff") + 1))
    mapping: Dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _needs_ftfy(text: str) -> bool:
    return not text.isascii() or _FTFY_SENSITIVE_ASCII.search(text) is not None


def _whitespace_clean(text: str) -> str:
    """open_clip's 'whitespace' clean-up: ftfy, double HTML unescape, whitespace collapse."""
    if _needs_ftfy(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # str.split() with no argument splits on any whitespace run and drops leading/trailing ones.
    return " ".join(text.split())


def clean_text(text: str) -> str:
    """CLIP's 'lower' clean-up: ftfy, double HTML unescape, whitespace collapse, lower-case."""
    return _whitespace_clean(text).lower()


def _load_merges(bpe_path: str) -> List[Tuple[str, str]]:
    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(
            f"BPE merges file not found: {bpe_path!r}. Pass bpe_path=None to use the file shipped with "
            f"paddlemix ({default_bpe_path()!r})."
        )
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header.
    merges = []
    for line in lines[1:_NUM_MERGES + 1]:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"Malformed merge line {line!r} in {bpe_path!r}; expected two symbols.")
        merges.append((parts[0], parts[1]))
    if len(merges) != _NUM_MERGES:
        raise ValueError(
            f"{bpe_path!r} holds {len(merges)} merges but CLIP needs {_NUM_MERGES}; use OpenAI's "
            f"bpe_simple_vocab_16e6.txt.gz."
        )
    return merges


class _TensorTokenizer:
    """What the CLIP BPE and BERT WordPiece tokenizers share: ``__call__`` as a Paddle tensor of
    ``batch_encode`` (which returns numpy, so data-loader workers never create Paddle tensors)."""

    def batch_encode(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> paddle.Tensor:
        """Tokenize to an int64 ``paddle.Tensor`` of shape [N, context_length] (N = 1 for a single str)."""
        return paddle.to_tensor(self.batch_encode(texts, context_length), dtype="int64")


class _WordCachedTokenizer(_TensorTokenizer):
    """A bounded per-word LRU cache of ``_word_uncached`` (as ``self._word``) that survives
    pickling. Subclasses set ``cache_size`` and call ``_build_cache()``."""

    cache_size: int

    def _word_uncached(self, word: str) -> Tuple:
        raise NotImplementedError

    def _build_cache(self) -> None:
        self._word = functools.lru_cache(maxsize=self.cache_size)(self._word_uncached)

    # The LRU wrapper holds a bound method, which cannot be pickled; data-loader workers started with
    # 'spawn' pickle the dataset (and its tokenizer), so drop the cache and rebuild it on arrival.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_word"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_cache()


class SimpleTokenizer(_WordCachedTokenizer):
    """CLIP byte-level BPE tokenizer producing the same ids as ``open_clip.tokenize``.

    Args:
        bpe_path: gzip'ed merges file; None uses the one shipped with paddlemix.
        context_length: default sequence length of ``__call__`` / ``batch_encode``.
        cache_size: number of distinct words whose ids are memoised (LRU). Caption vocabularies are
            Zipfian, so a few hundred thousand entries make BPE nearly free after warm-up while
            bounding memory on open-ended streams.
    """

    def __init__(
            self,
            bpe_path: Optional[str] = None,
            context_length: int = DEFAULT_CONTEXT_LENGTH,
            cache_size: int = 262144,
    ):
        if context_length is None or int(context_length) < 2:
            raise ValueError(
                f"context_length={context_length!r} is too small; it must hold at least the start and end "
                f"tokens (>= 2). CLIP models use 77."
            )
        self.bpe_path = bpe_path or default_bpe_path()
        self.context_length = int(context_length)
        self.cache_size = int(cache_size)

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {ch: b for b, ch in self.byte_encoder.items()}
        merges = _load_merges(self.bpe_path)

        # Base symbol ids follow code-point order: the printable bytes (which map to themselves) come
        # first, then the shifted ones (>= 256).
        base = sorted(self.byte_encoder.values())
        vocab = base + [ch + "</w>" for ch in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: Dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: Dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}

        self.vocab_size = len(vocab)
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.all_special_ids = [self.sot_token_id, self.eot_token_id]
        # Special tokens are matched first so that a literal "<start_of_text>" in a caption maps to its
        # id, as in the reference implementation.
        self.pattern = regex.compile(
            regex.escape(SOT_TOKEN) + "|" + regex.escape(EOT_TOKEN)
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self._build_cache()

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"bpe_path={self.bpe_path!r})"
        )

    def bpe(self, token: str) -> List[str]:
        """Apply the merges to one byte-mapped word; returns its symbols (the last ends with '</w>')."""
        symbols = list(token)
        symbols[-1] += "</w>"
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            # Lowest-ranked adjacent pair present in the word; rank = merge priority.
            best_rank, best = None, None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            left, right = best
            merged = left + right
            out = []
            k, n = 0, len(symbols)
            while k < n:
                if k + 1 < n and symbols[k] == left and symbols[k + 1] == right:
                    out.append(merged)
                    k += 2
                else:
                    out.append(symbols[k])
                    k += 1
            symbols = out
        return symbols

    def _word_uncached(self, word: str) -> Tuple[int, ...]:
        """Ids of one pre-tokenized word (memoised as ``self._word``)."""
        if word == SOT_TOKEN or word == EOT_TOKEN:
            return (self.encoder[word],)
        mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        return tuple(self.encoder[s] for s in self.bpe(mapped))

    def encode(self, text: str) -> List[int]:
        """Ids of ``text`` without start/end tokens, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r}")
        ids: List[int] = []
        word_ids = self._word
        for word in self.pattern.findall(clean_text(text)):
            ids.extend(word_ids(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of ``encode`` up to the clean-up (lower-case, collapsed whitespace).

        Word ends are rendered as a trailing space, as in the reference. Padding id 0 is a real
        token ('!'), so strip padding before decoding a row of ``__call__``'s output.
        """
        pieces = []
        for i in ids:
            i = int(i)
            if i not in self.decoder:
                raise ValueError(f"Token id {i} is outside the vocabulary [0, {self.vocab_size}).")
            pieces.append(self.decoder[i])
        data = bytearray(self.byte_decoder[ch] for ch in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def batch_encode(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> np.ndarray:
        """Tokenize to an int64 numpy array of shape [N, context_length].

        Returns numpy rather than a Paddle tensor so that data-loader worker processes never create
        Paddle tensors (they are collated in the main process).
        """
        if isinstance(texts, str):
            texts = [texts]
        context_length = self.context_length if context_length is None else int(context_length)
        if context_length < 2:
            raise ValueError(
                f"context_length={context_length} is too small; it must hold the start and end tokens (>= 2)."
            )
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            # Keep room for SOT and EOT; on overflow EOT replaces the last kept token, because the text
            # tower pools at the EOT position and must always find it.
            ids = ids[:context_length - 2]
            n = len(ids)
            out[row, 0] = self.sot_token_id
            out[row, 1:n + 1] = ids
            out[row, n + 1] = self.eot_token_id
        return out


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> SimpleTokenizer:
    """The shared default tokenizer, built on first use (loading the merges is not free, so not at import)."""
    return SimpleTokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH) -> paddle.Tensor:
    """Tokenize with the default CLIP tokenizer; same ids as ``open_clip.tokenize``."""
    return default_tokenizer()(texts, context_length=context_length)
