"""PaddleMIX's own model directories: PaddleMIX's numbers on load, PaddleMIX's layout on save.

The fixtures were written by PaddleMIX's ``CLIP`` / ``EVACLIP`` classes (see the fixtures' README);
PaddleMIX itself is never imported here.
"""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest
from test_zoo import features

import paddlemix

LEGACY = Path(__file__).parent / "fixtures" / "paddlemix_legacy"
# The first three were made by the reference set's producer; the others by tools/gen_paddlemix_fixtures.py.
CASES = ["clip_vit_quickgelu", "eva01", "eva02_meanpool", "clip_custom_text_gap", "eva02_class_token",
         "eva_plain_mlp_subln"]
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
        ("clip_custom_text_gap", {"pool_type": "avg"}),
        ("eva_plain_mlp_subln", {"mlp_norm_eps": 1e-6}),
        ("eva_plain_mlp_subln", {"pool_type": "avg"}),
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


# ------------------------------------------------------------------------------------ the way back

RUNTIME_ONLY = {"xattn"}  # picks PaddleMIX's attention kernel; not part of the architecture


def _tower(cfg: dict, key: str) -> dict:
    return {k: v for k, v in cfg[key].items() if k not in RUNTIME_ONLY}


@pytest.mark.parametrize("case", CASES)
def test_saved_paddlemix_directory_equals_what_paddlemix_wrote(case, tmp_path):
    """Keys, shapes, dtypes and bits of the weights, and every config field, as PaddleMIX's save_pretrained."""
    from paddlemix.zoo.checkpoint import load_state_dict

    model = paddlemix.create_model(LEGACY / case)
    out = tmp_path / "for-paddlemix"
    model.save_pretrained(str(out), layout="paddlemix")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model_state.pdparams"]
    theirs = json.loads((LEGACY / case / "config.json").read_text())
    ours = json.loads((out / "config.json").read_text())
    assert set(ours) == set(theirs)
    for key in theirs:
        if key in ("vision_cfg", "text_cfg", "vision_config", "text_config"):
            assert _tower(ours, key) == _tower(theirs, key), key
        else:
            assert ours[key] == theirs[key], key
    want, got = load_state_dict(LEGACY / case / "model_state.pdparams"), load_state_dict(out / "model_state.pdparams")
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _random_model(model_cfg: dict, dtype: str = "float32"):
    """A tiny model whose every weight is random, so a misplaced tensor changes the outputs."""
    paddle.seed(0)
    model = paddlemix.create_model(model_cfg) if isinstance(model_cfg, str) else paddlemix.CLIP(
        paddlemix.models.CLIPConfig.from_model_cfg(model_cfg))
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.set_value((rng.standard_normal(p.shape) * 0.05 + (1.0 if p.ndim == 1 and "norm" in p.name else 0.0))
                    .astype("float32"))
    if dtype != "float32":
        model.to(dtype=dtype)
    model.eval()
    return model


def _tiny(vision: dict, text: dict = None, **top) -> dict:
    base_v = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
    base_t = {"context_length": 16, "vocab_size": 512, "width": 64, "heads": 2, "layers": 2}
    return dict({"embed_dim": 32, "vision_cfg": dict(base_v, **vision), "text_cfg": dict(base_t, **(text or {}))}, **top)


EVA = {"eva_model_name": "eva-clip", "qkv_bias": True}
ROUND_TRIP = {
    "clip": _tiny({}),
    "clip_custom_text_gap_text_quickgelu": _tiny({"pool_type": "avg_all", "final_ln_after_pool": True,
                                                  "quick_gelu": False}, {"quick_gelu": True}, custom_text=True),
    "clip_layerscale": _tiny({"ls_init_value": 0.1}, {"ls_init_value": 0.1}),
    "eva01": _tiny(dict(EVA, mlp_ratio=4.3637)),
    "eva02_class_token": _tiny(dict(EVA, mlp_ratio=2.6667, rope=True, pt_hw_seq_len=4, intp_freq=True,
                                    naiveswiglu=True, subln=True, attn_norm_eps=1e-5, mlp_norm_eps=1e-6)),
    "eva_plain_mlp_subln_meanpool": _tiny(dict(EVA, subln=True, attn_norm_eps=1e-5, mlp_norm_eps=1e-5,
                                               pool_type="avg_all", final_ln_after_pool=True, ls_init_value=0.1)),
    "eva_postnorm_no_bias": _tiny({"eva_model_name": "eva-clip", "qkv_bias": False, "postnorm": True}),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip_through_paddlemix_layout_is_bit_exact(name, dtype, tmp_path):
    model = _random_model(ROUND_TRIP[name], dtype)
    out = tmp_path / "pmx"
    model.save_pretrained(str(out), layout="paddlemix")
    stored = {str(t.dtype) for t in paddle.load(str(out / "model_state.pdparams")).values()}
    assert stored == {f"paddle.{dtype}"}
    back = paddlemix.create_model(out, precision="bf16" if dtype == "bfloat16" else "fp32")
    before, after = model.state_dict(), back.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        np.testing.assert_array_equal(after[key].numpy(), value.numpy(), err_msg=key)
    if dtype != "float32":
        return  # Paddle has no bfloat16 CPU convolution; equal bits are equal numbers anyway
    back.eval()
    inputs = np.load(LEGACY / "eva01" / "inputs.npz")
    image = paddle.to_tensor(inputs["image"])
    text = paddle.to_tensor(inputs["text"][:, :16] % 512)
    with paddle.no_grad():
        np.testing.assert_array_equal(back.encode_image(image).astype("float32").numpy(),
                                      model.encode_image(image).astype("float32").numpy())
        np.testing.assert_array_equal(back.encode_text(text).astype("float32").numpy(),
                                      model.encode_text(text).astype("float32").numpy())


def test_semantics_paddlemix_cannot_reproduce_are_reported(tmp_path, caplog):
    """open_clip's QuickGELU model: PaddleMIX would run its vision tower with GELU; said, not hidden."""
    from paddlemix.zoo.legacy import paddlemix_differences

    assert paddlemix_differences(_tiny({}, quick_gelu=True)) == [
        "vision activation: QuickGELU here, GELU in PaddleMIX"]
    assert paddlemix_differences(_tiny({"pool_type": "avg", "final_ln_after_pool": True})) == [
        "image pooling: average of the patch tokens, normed after pooling here, average of every token, "
        "class token included, normed after pooling in PaddleMIX"]
    assert paddlemix_differences(_tiny({"pool_type": "avg_all"})) == [
        "image pooling: average of every token, class token included, normed before pooling here, average of "
        "every token, class token included, normed after pooling in PaddleMIX"]
    eva02 = _tiny(dict(EVA, naiveswiglu=True, subln=True))  # EVA-CLIP's own numerics: every sub-LN at 1e-6
    assert paddlemix_differences(eva02) == ["attention sub-LN eps: 1e-06 here, 1e-05 in PaddleMIX"]
    for case in CASES:
        from paddlemix.zoo.legacy import legacy_config_to_model_cfg

        assert paddlemix_differences(legacy_config_to_model_cfg(
            json.loads((LEGACY / case / "config.json").read_text()))) == []
    model = _random_model(_tiny({}, quick_gelu=True))
    with caplog.at_level("WARNING"):
        model.save_pretrained(str(tmp_path / "pmx"), layout="paddlemix")
    assert "vision activation: QuickGELU here, GELU in PaddleMIX" in caplog.text


def test_architectures_paddlemix_has_no_module_for_are_refused(tmp_path):
    from paddlemix.zoo.key_maps import ConversionError

    model = _random_model(_tiny({"no_ln_pre": True}))
    with pytest.raises(ConversionError, match="cannot express"):
        model.save_pretrained(str(tmp_path / "pmx"), layout="paddlemix")
    assert not (tmp_path / "pmx").exists()
    with pytest.raises(ValueError, match="layout must be"):
        model.save_pretrained(str(tmp_path / "x"), layout="torch")


def test_convert_cli_writes_paddlemix_layout(tmp_path, capsys):
    from paddlemix.convert import main

    case = Path(__file__).parent / "fixtures" / "parity" / "openai_quickgelu"  # open_clip weights
    out = tmp_path / "pmx"
    assert main(["--src", str(case / "model.safetensors"), "--model", str(case / "model_config.json"),
                 "--out", str(out), "--to", "paddlemix"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["round_trip"] == "bit-exact" and report["paddlemix_differences"] == [
        "vision activation: QuickGELU here, GELU in PaddleMIX"]
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "clip" and raw["architectures"] == ["CLIP"] and raw["text_cfg"]["quick_gelu"] is True
    assert main(["--src", str(case / "model.safetensors"), "--model", str(case / "model_config.json"),
                 "--out", str(out), "--to", "paddlemix"]) == 1  # exists


def test_zoo_entries_say_once_when_paddlemix_computes_otherwise(tmp_path, caplog, monkeypatch):
    """DFN was trained with QuickGELU in both towers; the entry keeps that, and says PaddleMIX does not."""
    from paddlemix.zoo import pretrained as zoo
    from paddlemix.zoo.download import DownloadError

    monkeypatch.setattr(zoo, "_NOTED", set())
    assert zoo.paddlemix_numerics_note(zoo.default_registry().find("CLIP-ViT-B-32-laion2B-s34B-b79K")) is None
    assert "1e-05 in PaddleMIX" in zoo.paddlemix_numerics_note(zoo.default_registry().find("EVA02-CLIP-L-14"))
    with caplog.at_level("WARNING", logger="paddlemix.zoo.pretrained"):
        for _ in range(2):
            with pytest.raises(DownloadError):  # offline and not cached: the note comes before the fetch
                zoo.resolve_pretrained("DFN2B-CLIP-ViT-B-16", offline=True, cache_dir=tmp_path)
    assert caplog.text.count("DFN2B-CLIP-ViT-B-16 reproduces the original release") == 1
    assert "vision activation: QuickGELU here, GELU in PaddleMIX" in caplog.text
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "PaddleMIX numerics: reproduces the original release" in readme


def test_force_quick_gelu_reaches_towers_that_set_their_own_activation():
    from paddlemix.models.layers import QuickGELU

    plain = paddlemix.create_model(LEGACY / "clip_vit_quickgelu")
    forced = paddlemix.create_model(LEGACY / "clip_vit_quickgelu", force_quick_gelu=True)
    assert not isinstance(plain.visual.transformer.blocks[0].mlp.act, QuickGELU)
    assert isinstance(plain.text.transformer.blocks[0].mlp.act, QuickGELU)
    assert isinstance(forced.visual.transformer.blocks[0].mlp.act, QuickGELU)
