"""Tokenizers follow the loaded model's context length; the export warns only about random weights."""
import logging

import numpy as np
import paddle
import pytest

import paddlemix
from paddlemix import clip
from paddlemix.export import main as export_main

TEXTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A saved CLIP-tiny-demo (context length 16), as the demo training writes it."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    paddle.seed(0)
    paddlemix.create_model("CLIP-tiny-demo").save_pretrained(str(out))
    return out


def test_clip_load_then_tokenize_at_77_works_on_a_16_token_model(trained_dir):
    model, preprocess = clip.load(str(trained_dir))
    assert model.context_length == 16
    images = paddle.randn([2, 3, 32, 32])
    with paddle.no_grad():
        per_image, per_text = model(images, clip.tokenize(TEXTS))
        want_image, want_text = model(images, clip.tokenize(TEXTS, context_length=16))
    assert per_image.shape == [2, 3] and per_text.shape == [3, 2]
    np.testing.assert_array_equal(per_image.numpy(), want_image.numpy())
    np.testing.assert_array_equal(per_text.numpy(), want_text.numpy())
    # A text that does not fit the model's context fails naming both lengths and the fix.
    long_text = " ".join(["word"] * 30)
    with pytest.raises(ValueError, match=r"77 tokens per row, but this model's context length is 16.*truncate=True"):
        model(images, clip.tokenize([long_text]))
    with paddle.no_grad():
        model(images, clip.tokenize([long_text], context_length=16, truncate=True))


def test_get_tokenizer_of_a_model_dir_uses_its_context_length(trained_dir):
    assert paddlemix.get_tokenizer(str(trained_dir)).context_length == 16
    model = paddlemix.create_model(str(trained_dir))
    assert paddlemix.get_tokenizer(model).context_length == 16
    with pytest.raises(ValueError, match=r"77 tokens per row, more than this model's context length 16"):
        model.encode_text(paddlemix.tokenize(TEXTS))


def test_export_warns_about_random_weights_only_when_none_were_loaded(trained_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="paddlemix.export"):
        assert export_main(["--model", str(trained_dir), "--out", str(tmp_path / "trained"), "--no-check"]) == 0
    assert "randomly initialised" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="paddlemix.export"):
        assert export_main(["--model", "CLIP-tiny-demo", "--out", str(tmp_path / "random"), "--no-check"]) == 0
    assert "randomly initialised" in caplog.text
