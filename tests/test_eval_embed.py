"""``python -m paddlemix.embed`` writes exactly what ``encode_image`` / ``encode_text`` return."""
import importlib.util
import runpy
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from paddlemix.data.tokenizer import SimpleTokenizer
from paddlemix.data.transforms import image_transform
from paddlemix.embed import main as embed_main
from paddlemix.eval.datasets import load_image

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("eval_synthetic", FIXTURES / "eval" / "synthetic.py")
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)

TEXTS = ["a red circle", "a photo of a blue square on a dark background", "green", "two triangles, one big"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.tiny_clip(tmp_path_factory.mktemp("tiny"), seed=7)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green")]):
        synthetic.draw(shape, colour, seed=i).save(root / f"{shape}.png")
    synthetic.draw("circle", "blue", seed=9, size=(30, 50)).convert("L").save(root / "sub" / "gray.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_embed_images_equal_encode_image(tiny, photos, tmp_path):
    model, model_dir = tiny
    out = tmp_path / "img.npy"
    assert embed_main(["--model", str(model_dir), "--images", str(photos), "--out", str(out), "--batch-size", "3",
                       "--num-workers", "2", "--no-progress"]) == 0
    files = (tmp_path / "img.files.txt").read_text().splitlines()
    assert files == ["circle.png", "square.png", "sub/gray.jpg", "triangle.png"]
    got = np.load(out)
    tf = image_transform(32, is_train=False)
    with paddle.no_grad():
        want = np.concatenate([model.encode_image(tf(load_image(photos / f)).unsqueeze(0)).numpy() for f in files])
    assert got.dtype == np.float32 and got.shape == (4, 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() > 1e-2  # not normalised unless asked

    assert embed_main(["--model", str(model_dir), "--images", str(photos), "--out", str(out), "--normalize",
                       "--num-workers", "0", "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(out), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_embed_texts_equal_encode_text(tiny, tmp_path):
    model, model_dir = tiny
    texts_file = tmp_path / "captions.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    out = tmp_path / "txt.npy"
    assert embed_main(["--model", str(model_dir), "--texts", str(texts_file), "--out", str(out),
                       "--batch-size", "3", "--no-progress"]) == 0
    tok = SimpleTokenizer(context_length=model.context_length)
    with paddle.no_grad():
        want = model.encode_text(paddle.to_tensor(tok.batch_encode(TEXTS))).numpy()
    got = np.load(out)
    assert got.shape == (4, 32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    texts_file.write_text("one\n\nthree\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"blank line\(s\) \[2\]"):
        embed_main(["--model", str(model_dir), "--texts", str(texts_file), "--out", str(out)])
    with pytest.raises(SystemExit, match="must end in .npy"):
        embed_main(["--model", str(model_dir), "--texts", str(texts_file), "--out", str(tmp_path / "x.bin")])


def test_embed_requires_exactly_one_source(tiny, tmp_path, capsys):
    _, model_dir = tiny
    for extra in ([], ["--images", str(tmp_path), "--texts", str(tmp_path / "t.txt")]):
        with pytest.raises(SystemExit):
            embed_main(["--model", str(model_dir), "--out", str(tmp_path / "x.npy")] + extra)
    assert "--images" in capsys.readouterr().err


def test_module_entry_point(tiny, tmp_path, monkeypatch, capsys):
    """``python -m paddlemix.embed`` runs ``main`` (in-process via runpy: a subprocess would re-import Paddle)."""
    _, model_dir = tiny
    (tmp_path / "t.txt").write_text("hello\n")
    monkeypatch.setattr(sys, "argv", ["paddlemix.embed", "--model", str(model_dir), "--texts", str(tmp_path / "t.txt"),
                                      "--out", str(tmp_path / "t.npy"), "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("paddlemix.embed", run_name="__main__")
    assert exit_info.value.code == 0
    assert np.load(tmp_path / "t.npy").shape == (1, 32)
