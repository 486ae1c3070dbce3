"""CLIP tokenizer: parity with open_clip 3.3.0 ids and the padding / truncation contract."""
import html
import json
import os
import pickle

import ftfy
import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddlemix.data.tokenizer import SimpleTokenizer, clean_text, tokenize

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(FIXTURES, "tokens.json"), encoding="utf-8") as f:
        texts = json.load(f)["texts"]
    with np.load(os.path.join(FIXTURES, "tokens.npz")) as data:
        ids = {name: data[name] for name in data.files}
    return texts, ids


def test_vocab_constants(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert tokenizer.sot_token_id == SOT
    assert tokenizer.eot_token_id == EOT


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_match_open_clip(tokenizer, reference, context_length):
    texts, ids = reference
    expected = ids[f"input_ids_{context_length}"]
    assert expected.shape == (60, context_length)
    got = tokenizer.batch_encode(texts, context_length)
    assert got.dtype == np.int64
    mismatched = [texts[i] for i in np.nonzero((got != expected).any(axis=1))[0]]
    assert mismatched == []


def test_module_tokenize_matches_reference(reference):
    texts, ids = reference
    out = tokenize(texts)
    assert isinstance(out, paddle.Tensor)
    assert out.dtype == paddle.int64
    assert list(out.shape) == [60, 77]
    np.testing.assert_array_equal(out.numpy(), ids["input_ids_77"])


def test_known_ids(tokenizer):
    # 'a</w>' = 320, 'photo</w>' = 1125, 'of</w>' = 539, 'cat</w>' = 2368 in OpenAI's vocabulary.
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("A  PHOTO\tof a\ncat ") == [320, 1125, 539, 320, 2368]


def test_decode_round_trip(tokenizer):
    text = "a photo of 2 dogs, isn't it? yes: 100% café"
    assert tokenizer.decode(tokenizer.encode(text)) == "a photo of 2 dogs , isn 't it ? yes : 1 0 0 % café "


def test_decode_rejects_unknown_id(tokenizer):
    with pytest.raises(ValueError, match="49408"):
        tokenizer.decode([320, 49408])


def test_empty_string(tokenizer):
    out = tokenizer("")
    expected = np.zeros((1, 77), dtype=np.int64)
    expected[0, :2] = [SOT, EOT]
    np.testing.assert_array_equal(out.numpy(), expected)
    assert tokenizer.encode("   \n ") == []


def test_truncation_forces_eot(tokenizer):
    text = " ".join(["cat"] * 100)
    out = tokenizer(text, context_length=10).numpy()
    np.testing.assert_array_equal(out, [[SOT] + [2368] * 8 + [EOT]])
    # Exactly filling the context needs no truncation; one more token does.
    exact = tokenizer(" ".join(["cat"] * 8), context_length=10).numpy()
    np.testing.assert_array_equal(exact, [[SOT] + [2368] * 8 + [EOT]])
    short = tokenizer(" ".join(["cat"] * 7), context_length=10).numpy()
    np.testing.assert_array_equal(short, [[SOT] + [2368] * 7 + [EOT, 0]])


def test_list_vs_single_string(tokenizer):
    single = tokenizer("a red car")
    batch = tokenizer(["a red car", "a blue bus", ""])
    assert list(single.shape) == [1, 77] and list(batch.shape) == [3, 77]
    assert single.dtype == paddle.int64 and batch.dtype == paddle.int64
    np.testing.assert_array_equal(single.numpy()[0], batch.numpy()[0])
    assert tokenizer.batch_encode([], 77).shape == (0, 77)


def test_context_length_default_and_override():
    tok = SimpleTokenizer(context_length=12)
    assert tok("a cat").shape == [1, 12]
    assert tok("a cat", context_length=5).shape == [1, 5]
    with pytest.raises(ValueError, match="context_length"):
        tok("a cat", context_length=1)
    with pytest.raises(ValueError, match="context_length"):
        SimpleTokenizer(context_length=0)


def test_literal_special_token(tokenizer):
    assert tokenizer.encode("<start_of_text> x <END_OF_TEXT>") == [SOT, 343, EOT]


def test_missing_bpe_file_names_path(tmp_path):
    missing = str(tmp_path / "nope.txt.gz")
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        SimpleTokenizer(bpe_path=missing)


def test_cache_does_not_change_results_and_survives_pickle(tokenizer, reference):
    texts, ids = reference
    small = SimpleTokenizer(cache_size=4)  # constant eviction
    np.testing.assert_array_equal(small.batch_encode(texts, 77), ids["input_ids_77"])
    clone = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(clone.batch_encode(texts, 16), ids["input_ids_16"])


def _reference_clean(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=40))
def test_ascii_fast_path_equals_full_clean(text):
    """Plain ASCII skips ftfy; on every ASCII string the result must equal the full clean-up."""
    assert clean_text(text) == _reference_clean(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_unicode_clean_equals_full_clean(text):
    assert clean_text(text) == _reference_clean(text)
