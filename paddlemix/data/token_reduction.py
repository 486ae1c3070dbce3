"""CLIPA's token reduction for training (Li et al., "An Inverse Scaling Law for CLIP Training",
arXiv:2305.07017).

CLIPA pre-trains on short sequences and fine-tunes briefly on full ones. Larger encoders tolerate
shorter sequences, so most of the compute goes into few tokens per sample.

Image side, two ways to get fewer patch tokens:

* lower resolution: :func:`resize_images` / :class:`ImageResolutionReducer` shrink a batch (for
  example 224 -> 112 / 84 / 64 px) with an anti-aliased separable filter, and the model is built
  for that size (``create_model(name, force_image_size=112)``). Fine-tuning later at full size
  loads the same weights with ``force_image_size=224``; the loader then resamples the learned
  position table to the new grid.
* random patch masking: the ViT tower's ``patch_dropout`` (``force_patch_dropout=0.5`` keeps a
  random half of the patches of each image during training; evaluation sees all of them).

Text side, :class:`TextTokenReducer` keeps at most ``length`` tokens per caption, framed exactly
as the model's tokenizer frames them (start/CLS, end/SEP, padding):

* ``truncate``: the first tokens (what the tokenizer does on its own);
* ``random``: a random subset of the tokens, in their original order;
* ``block``: a random run of consecutive tokens;
* ``syntax``: whole words by part of speech, nouns first, then adjectives, then verbs, then the
  rest, ties going to the earlier word; the kept words stay in caption order.

Part-of-speech tagging: no maintained tagger with a trained English model installs from PyPI
here. spaCy's ``en_core_web_sm`` is not published on PyPI (only unofficial re-uploads are), NLTK's
tagger data comes from ``nltk.download``, not PyPI, and ``textblob-aptagger`` (2013), whose wheel
does carry a trained perceptron, fails to import with current TextBlob and stores its model as a
Python 2 pickle. :class:`HeuristicPosTagger` is therefore the default: closed-class
word lists, a small caption-vocabulary lexicon and suffix rules, with unknown open-class words
taken as nouns. It is deterministic and good enough to rank caption words, but it is not a
trained tagger. Any callable ``tagger(words) -> [(word, penn_tag), ...]`` or ``-> [penn_tag, ...]``
can replace it, for example ``nltk.pos_tag`` where NLTK's tagger data is installed.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
import regex

from .bert_tokenizer import BertTokenizer
from .tokenizer import SimpleTokenizer

__all__ = [
    "TEXT_STRATEGIES",
    "resize_images",
    "ImageResolutionReducer",
    "TextTokenReducer",
    "HeuristicPosTagger",
    "syntax_keep_words",
]

TEXT_STRATEGIES = ("truncate", "random", "block", "syntax")


# ------------------------------------------------------------------------------------------- images
def _filter(name: str) -> Tuple[Callable[[np.ndarray], np.ndarray], float]:
    if name == "bilinear":
        return (lambda x: np.clip(1.0 - np.abs(x), 0.0, None)), 1.0
    if name == "bicubic":  # Keys' cubic with a = -0.5, as PIL uses
        a = -0.5

        def cubic(x: np.ndarray) -> np.ndarray:
            x = np.abs(x)
            near = ((a + 2) * x - (a + 3)) * x * x + 1
            far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
            return np.where(x < 1, near, np.where(x < 2, far, 0.0))

        return cubic, 2.0
    if name == "area":  # box filter: each output pixel averages the input pixels it covers
        return (lambda x: ((x > -0.5) & (x <= 0.5)).astype(np.float64)), 0.5
    raise ValueError(f"mode must be 'area', 'bilinear' or 'bicubic', got {name!r}")


def _resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """``[out, in]`` weights of a 1-D resize, computed as PIL computes its coefficients.

    When shrinking, the filter is widened by ``in/out`` so every input pixel contributes, which
    is what keeps 224 -> 64 px from aliasing (plain bilinear sampling would skip 3 of 4 pixels).
    The window bounds and the arithmetic follow PIL's, so ties on a box edge fall the same way.
    """
    kernel, support = _filter(mode)
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support *= stretch
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = np.arange(lo, hi, dtype=np.float64)
        w = kernel((x - center + 0.5) * (1.0 / stretch))
        total = w.sum()
        if total == 0:
            raise ValueError(f"cannot resize {in_size} -> {out_size} with mode {mode!r}")
        weights[i, lo:hi] = w / total
    return weights.astype(np.float32)


def resize_images(
    images: Union[paddle.Tensor, np.ndarray], size: Union[int, Sequence[int]], mode: str = "bilinear"
) -> Union[paddle.Tensor, np.ndarray]:
    """Resize a ``[..., H, W]`` batch to ``size`` with an anti-aliased separable filter.

    Works on numpy (data-loader workers create no Paddle tensors) and on Paddle tensors (on the
    device, differentiable); both compute ``R_h @ x @ R_w^T`` with the same weights, which equal
    PIL's float resampling for 'bilinear' / 'bicubic' and average whole pixels for 'area'.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    in_h, in_w = images.shape[-2], images.shape[-1]
    rh = _resize_matrix(in_h, out_h, mode)
    rw_t = np.ascontiguousarray(_resize_matrix(in_w, out_w, mode).T)
    if isinstance(images, np.ndarray):
        return (rh @ images.astype(np.float32) @ rw_t).astype(images.dtype if images.dtype.kind == "f" else np.float32)
    dtype = images.dtype
    x = images.astype("float32")
    x = paddle.matmul(paddle.matmul(paddle.to_tensor(rh), x), paddle.to_tensor(rw_t))
    return x.astype(dtype)


class ImageResolutionReducer:
    """Collate-time step that brings a batch of images to CLIPA's reduced resolution."""

    def __init__(self, size: Union[int, Sequence[int]], mode: str = "bilinear"):
        _filter(mode)  # validate early
        self.size = size
        self.mode = mode

    def __call__(self, images: Union[paddle.Tensor, np.ndarray]):
        return resize_images(images, self.size, self.mode)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(size={self.size}, mode={self.mode!r})"


# --------------------------------------------------------------------------------- part of speech
_CLOSED_CLASS: Dict[str, str] = {}
for _tag, _words in {
    "DT": "a an the this that these those each every some any no another both all either neither half",
    "PRP": "i you he she it we they me him her us them itself himself herself themselves",
    "PRP$": "my your his its our their",
    "IN": "of in on at by for with from into onto over under above below near beside besides behind between "
          "among through across along around against toward towards during before after without within upon "
          "about like via off out up down inside outside atop beneath underneath amid while as than if because",
    "TO": "to",
    "CC": "and or but nor yet so plus",
    "MD": "will would can could should may might must shall",
    "VB": "be do have",
    "VBZ": "is has does 's",
    "VBP": "are am 're",
    "VBD": "was were had did",
    "VBN": "been done",
    "VBG": "being having doing",
    "RB": "very too also not n't just only really quite here now then still almost nearly together away back "
          "again even rather somewhat slightly well",
    "EX": "there",
    "WDT": "which whatever",
    "WP": "who whom what",
    "WRB": "where when why how",
    "CD": "one two three four five six seven eight nine ten eleven twelve dozen hundred thousand several",
}.items():
    for _w in _words.split():
        _CLOSED_CLASS[_w] = _tag

_MODALS_AND_TO = frozenset(["to"] + [w for w, t in _CLOSED_CLASS.items() if t == "MD"])
_ADJECTIVES = set(
    """red green blue yellow white black brown grey gray orange pink purple golden silver dark light bright pale
    big small large little tall short long old new young huge tiny giant wooden empty full open closed wet dry
    hot cold warm cool happy sad beautiful pretty cute busy quiet clean dirty round flat high low wide narrow
    thick thin heavy fresh many few other same different various single double modern ancient rural urban sunny
    cloudy snowy rainy foggy colorful colourful striped plastic metal metallic fluffy furry hairy shiny smooth
    rough soft hard sharp blurry clear calm wild tame fancy plain simple strange funny nice good bad great fine
    delicious tasty sweet sour spicy healthy sliced fried baked grilled raw ripe green-colored multiple main
    left right front top bottom middle upper lower outdoor indoor electric digital vintage antique crowded lush
    grassy sandy rocky muddy dense sparse tidy messy square triangular circular rectangular oval"""
    .split()
)
_VERBS = set(
    """sit sits sat stand stands stood walk walks run runs ran ride rides rode hold holds held eat eats ate look
    looks lie lies lay lays fly flies flew swim swims swam jump jumps wear wears wore carry carries drive drives
    drove park parks watch watches read reads talk talks sleep sleeps slept cook cooks cut cuts throw throws
    threw catch catches caught hit hits kick kicks wait waits cross crosses pose poses smile smiles stare stares
    grab grabs use uses show shows take takes took make makes made go goes went come comes came get gets got
    put puts rest rests graze grazes surf surfs ski skis skate skates drink drinks drank climb climbs hang hangs
    hung lean leans pull pulls push pushes fill fills cover covers feature features display displays contain
    contains prepare prepares serve serves bake bakes wash washes paint paints draw draws drew build builds
    built play plays see sees saw seem seems appear appears face faces line lines sell sells sold fix fixes
    give gives gave keep keeps kept leave leaves left let lets bring brings brought"""
    .split()
)
_ING_NOUNS = set(
    """thing something nothing anything everything king ring wing string spring swing sling building ceiling
    clothing evening morning wedding frosting icing railing painting drawing sibling pudding stuffing crossing
    parking lightning ping ding bedding siding ceiling topping seasoning dressing filling awning""".split()
)
_LY_NOUNS = set("family fly belly jelly lily bully rally ally italy july assembly supply".split())
_ED_NOUNS = set("bed shed sled red bread head thread seed weed speed steed".split())
_ADJ_SUFFIXES = ("ous", "ful", "less", "ive", "able", "ible", "ish", "ical", "ular", "est")
_NUMBER = regex.compile(r"^\d+(?:[.,]\d+)*(?:st|nd|rd|th|s)?$")
_WORD = regex.compile(r"[\p{L}\p{N}]+(?:['’][\p{L}]+)*|[^\s\p{L}\p{N}]")


class HeuristicPosTagger:
    """A small rule-based English tagger emitting Penn Treebank tags (NN, JJ, VB*, DT, IN, ...).

    Not a trained model: closed-class words come from fixed lists, common caption adjectives and
    verbs from a lexicon, and unknown words by suffix (``-ing`` VBG, ``-ed`` VBN, ``-ly`` RB,
    ``-ous/-ful/-less/-ive/-able/...`` JJ), else NN. One context rule: a lexicon word right
    after 'to' or a modal is a verb. That is what syntax masking needs, ranking nouns over
    adjectives over verbs over the rest, and it is deterministic across machines.
    """

    def tag_word(self, word: str, prev: Optional[str] = None) -> str:
        w = word.lower()
        if not any(ch.isalnum() for ch in w):
            return "."
        if _NUMBER.match(w):
            return "CD"
        if w in _CLOSED_CLASS:
            return _CLOSED_CLASS[w]
        if prev in _MODALS_AND_TO and (w in _VERBS or w in _ADJECTIVES):
            return "VB"
        if w in _ADJECTIVES:
            return "JJ"
        if w in _VERBS:
            return "VBZ" if w.endswith("s") and w[:-1] in _VERBS else "VB"
        if w.endswith("ing") and len(w) > 4 and w not in _ING_NOUNS:
            return "VBG"
        if w.endswith("ed") and len(w) > 3 and w not in _ED_NOUNS:
            return "VBN"
        if w.endswith("ly") and len(w) > 3 and w not in _LY_NOUNS:
            return "RB"
        if w.endswith(_ADJ_SUFFIXES) and len(w) > 5:
            return "JJ"
        return "NNS" if w.endswith("s") and not w.endswith("ss") and len(w) > 3 else "NN"

    def __call__(self, words: Sequence[str]) -> List[Tuple[str, str]]:
        tags, prev = [], None
        for word in words:
            tags.append((word, self.tag_word(word, prev)))
            prev = word.lower()
        return tags


def _priority(tag: str) -> int:
    """CLIPA's order: nouns, adjectives, verbs, everything else."""
    if tag.startswith("NN"):
        return 0
    if tag.startswith("JJ"):
        return 1
    if tag.startswith("VB"):
        return 2
    return 3


def syntax_keep_words(text: str, max_words: int, tagger: Optional[Callable] = None) -> str:
    """The caption reduced to its ``max_words`` highest-priority words, in caption order."""
    words = _WORD.findall(text)
    if len(words) <= max_words:
        return " ".join(words)
    tagged = (tagger or HeuristicPosTagger())(words)
    tags = [t[1] if isinstance(t, (tuple, list)) else t for t in tagged]
    if len(tags) != len(words):
        raise ValueError(f"the POS tagger returned {len(tags)} tags for {len(words)} words")
    order = sorted(range(len(words)), key=lambda i: (_priority(tags[i]), i))
    keep = sorted(order[:max_words])
    return " ".join(words[i] for i in keep)


# ------------------------------------------------------------------------------------------- text
class TextTokenReducer:
    """Tokenize captions to ``length`` tokens with one of CLIPA's reduction strategies.

    Args:
        tokenizer: the model's tokenizer (:class:`SimpleTokenizer` BPE or :class:`BertTokenizer`);
            its special tokens and padding frame every row, so ``strategy='truncate'`` returns
            exactly ``tokenizer(texts, context_length=length)``.
        length: tokens per row including the special tokens (CLIPA uses 8, 16 or 32).
        strategy: one of :data:`TEXT_STRATEGIES`.
        seed: seed of the random strategies (a fixed seed gives a reproducible stream).
        pos_tagger: for 'syntax'; defaults to :class:`HeuristicPosTagger`.

    The model's text context length must equal ``length`` (build it with
    ``force_context_length=length``), as in CLIPA's pre-training.
    """

    def __init__(
        self,
        tokenizer: Union[SimpleTokenizer, BertTokenizer],
        length: int,
        strategy: str = "truncate",
        seed: Optional[int] = None,
        pos_tagger: Optional[Callable] = None,
    ):
        if strategy not in TEXT_STRATEGIES:
            raise ValueError(f"strategy must be one of {TEXT_STRATEGIES}, got {strategy!r}")
        self.tokenizer = tokenizer
        self.length = int(length)
        self.strategy = strategy
        self.rng = np.random.default_rng(seed)
        self.pos_tagger = pos_tagger or HeuristicPosTagger()
        if isinstance(tokenizer, BertTokenizer):
            self._prefix = [tokenizer.cls_token_id]
            sep_slot = tokenizer.add_sep_token
            keep_sep = sep_slot and not tokenizer.strip_sep_token
            self._suffix = [tokenizer.sep_token_id] if keep_sep else []
            self._pad = tokenizer.pad_token_id
            self._room = self.length - 1 - (1 if sep_slot else 0)
            self._strip = tokenizer.sep_token_id if tokenizer.strip_sep_token else None
        else:
            self._prefix, self._suffix = [tokenizer.sot_token_id], [tokenizer.eot_token_id]
            self._pad, self._room, self._strip = 0, self.length - 2, None
        if self._room < 1:
            raise ValueError(f"length={length} leaves no room for text after the special tokens")

    def _select(self, ids: List[int]) -> List[int]:
        n, room = len(ids), self._room
        if n <= room or self.strategy in ("truncate", "syntax"):
            return ids[:room]
        if self.strategy == "random":
            return [ids[i] for i in np.sort(self.rng.choice(n, size=room, replace=False))]
        start = int(self.rng.integers(0, n - room + 1))  # block
        return ids[start:start + room]

    def batch_encode(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        """int64 ids ``[N, length]`` (numpy, for data-loader workers)."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.length), self._pad, dtype=np.int64)
        for row, text in enumerate(texts):
            if self.strategy == "syntax":
                # CLIPA keeps as many words as there are token slots, then truncates the tokens.
                text = syntax_keep_words(text, self._room, self.pos_tagger)
            seq = self._prefix + self._select(self.tokenizer.encode(text)) + self._suffix
            out[row, : len(seq)] = seq
        if self._strip is not None:
            out[out == self._strip] = self._pad
        return out

    def __call__(self, texts: Union[str, Sequence[str]]) -> paddle.Tensor:
        return paddle.to_tensor(self.batch_encode(texts), dtype="int64")

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(length={self.length}, strategy={self.strategy!r})"
