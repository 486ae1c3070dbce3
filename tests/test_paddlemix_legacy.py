"""PaddleMIX's own model directories: PaddleMIX's numbers on load, PaddleMIX's layout on save.

The fixtures were written by PaddleMIX's ``CLIP`` / ``EVACLIP`` classes (see the fixtures' README);
PaddleMIX itself is never imported here.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from test_zoo import features

import paddlemix

LEGACY = Path(__file__).parent / "fixtures" / "paddlemix_legacy"
CASES = ["clip_vit_quickgelu", "eva01", "eva02_meanpool"]
TOL = 1e-4


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    # Local PaddleMIX directories are converted into the cache once; keep that per test.
    monkeypatch.setenv("PADDLEMIX_HOME", str(tmp_path / "home"))


def _check(model, case_dir: Path, tol: float = TOL):
    expected = np.load(case_dir / "outputs.npz")
    image, text = features(model, case_dir)
    np.testing.assert_allclose(image, expected["image_features"], rtol=0, atol=tol)
    np.testing.assert_allclose(text, expected["text_features"], rtol=0, atol=tol)


@pytest.mark.parametrize("case", CASES)
def test_paddlemix_directory_gives_paddlemix_numbers(case):
    model = paddlemix.create_model(LEGACY / case)
    model.eval()
    _check(model, LEGACY / case)


def test_translation_is_explicit_config_fields():
    """PaddleMIX's semantics arrive as ordinary config fields, not as a flag naming the source."""
    from paddlemix.zoo.legacy import legacy_config_to_model_cfg

    def cfg(case):
        return legacy_config_to_model_cfg(json.loads((LEGACY / case / "config.json").read_text()))

    clip = cfg("clip_vit_quickgelu")
    assert clip["vision_cfg"]["quick_gelu"] is False and clip["text_cfg"]["quick_gelu"] is True
    eva02 = cfg("eva02_meanpool")
    assert eva02["vision_cfg"]["pool_type"] == "avg_all" and eva02["vision_cfg"]["final_ln_after_pool"]
    assert (eva02["vision_cfg"]["attn_norm_eps"], eva02["vision_cfg"]["mlp_norm_eps"]) == (1e-5, 1e-6)
    assert cfg("eva01")["vision_cfg"].get("pool_type", "tok") == "tok"


@pytest.mark.parametrize(
    "case, break_it",
    [
        ("eva02_meanpool", {"pool_type": "avg"}),  # open_clip's patch-only average
        ("clip_vit_quickgelu", {"quick_gelu": True}),  # QuickGELU in the vision tower too
        ("eva02_meanpool", {"attn_norm_eps": 1e-6}),
    ],
)
def test_each_field_matters(case, break_it, tmp_path):
    """Each PaddleMIX difference moves the image features: the parity test would catch its loss."""
    from paddlemix.zoo.legacy import legacy_config_to_model_cfg

    model_cfg = legacy_config_to_model_cfg(json.loads((LEGACY / case / "config.json").read_text()))
    model_cfg["vision_cfg"].update(break_it)
    cfg_file = tmp_path / "model.json"
    cfg_file.write_text(json.dumps(model_cfg))
    good = paddlemix.create_model(LEGACY / case)
    bad = paddlemix.create_model(str(cfg_file))
    bad.set_state_dict(good.state_dict())
    bad.eval()
    expected = np.load(LEGACY / case / "outputs.npz")["image_features"]
    image, _ = features(bad, LEGACY / case)
    assert np.abs(image - expected).max() > 1e-5
