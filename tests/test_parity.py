"""Numeric parity with the PyTorch references (open_clip 3.3.0, EVA-CLIP, HF transformers).

Each fixture is a tiny random model whose every weight matters; the features must match the
reference's within 1e-4 from both the safetensors and the torch-pickle copy of the weights.
"""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddlemix

PARITY = Path(__file__).parent / "fixtures" / "parity"
TOL = 1e-4

OPEN_CLIP_CASES = ["openai_quickgelu", "clipa_gap", "eva02_rope_swiglu", "eva01_g", "eva18b_style"]


def _features(model, case_dir: Path):
    inputs = np.load(case_dir / "inputs.npz")
    with paddle.no_grad():
        image = model.encode_image(paddle.to_tensor(inputs["image"])).numpy()
        text = model.encode_text(paddle.to_tensor(inputs["text"])).numpy()
    return image, text


def _check(model, case_dir: Path):
    expected = np.load(case_dir / "outputs.npz")
    image, text = _features(model, case_dir)
    assert image.shape == expected["image_features"].shape
    assert text.shape == expected["text_features"].shape
    np.testing.assert_allclose(image, expected["image_features"], rtol=0, atol=TOL)
    np.testing.assert_allclose(text, expected["text_features"], rtol=0, atol=TOL)
    np.testing.assert_allclose(float(model.logit_scale), float(expected["logit_scale"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("case", OPEN_CLIP_CASES)
def test_config_json_parity(case, weights):
    case_dir = PARITY / case
    model = paddlemix.create_model(case_dir / "model_config.json", pretrained=case_dir / weights)
    _check(model, case_dir)


def test_hf_directory_parity():
    """An HF transformers CLIP directory is a model name; its weights load by default."""
    case_dir = PARITY / "hf_clip"
    model = paddlemix.create_model(case_dir)
    _check(model, case_dir)


def test_hf_weights_file_parity():
    case_dir = PARITY / "hf_clip"
    model = paddlemix.create_model(case_dir, pretrained=case_dir / "model.safetensors")
    _check(model, case_dir)


def test_parity_catches_a_wrong_weight():
    """The tolerance is meaningful: perturbing one weight moves the features past it."""
    case_dir = PARITY / "openai_quickgelu"
    model = paddlemix.create_model(case_dir / "model_config.json", pretrained=case_dir / "model.safetensors")
    w = model.visual.transformer.blocks[1].attn.qkv.weight
    w.set_value(w.numpy() * 1.05)
    with pytest.raises(AssertionError):
        _check(model, case_dir)


def test_logits_are_scaled_cosine_similarities():
    case_dir = PARITY / "openai_quickgelu"
    model = paddlemix.create_model(case_dir / "model_config.json", pretrained=case_dir / "model.safetensors")
    expected = np.load(case_dir / "outputs.npz")
    inputs = np.load(case_dir / "inputs.npz")
    img = expected["image_features"] / np.linalg.norm(expected["image_features"], axis=-1, keepdims=True)
    txt = expected["text_features"] / np.linalg.norm(expected["text_features"], axis=-1, keepdims=True)
    ref = np.exp(expected["logit_scale"]) * img @ txt.T
    with paddle.no_grad():
        per_image, per_text = model.get_logits(paddle.to_tensor(inputs["image"]), paddle.to_tensor(inputs["text"]))
        image_f, text_f, scale = model(paddle.to_tensor(inputs["image"]), paddle.to_tensor(inputs["text"]))
    np.testing.assert_allclose(per_image.numpy(), ref, atol=1e-3)
    np.testing.assert_allclose(per_text.numpy(), ref.T, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(image_f.numpy(), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(float(scale), np.exp(expected["logit_scale"]), rtol=1e-6)


def test_meta_names_every_case():
    for case in OPEN_CLIP_CASES + ["hf_clip"]:
        meta = json.loads((PARITY / case / "meta.json").read_text())
        assert meta["reference"] in {"open_clip", "eva_clip", "transformers"}
