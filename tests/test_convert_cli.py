"""``python -m paddlemix.convert``: checkpoints in, verified paddlemix model directories out.

Sources are the torch-written parity fixtures (open_clip, EVA-CLIP, HF transformers) and a
PaddleMIX directory generated in its layout; every output is loaded back with
``CLIP.from_pretrained`` and compared with the source model and with the features the
reference implementation computed in torch.
"""
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_zoo import (
    CLIP_CASE,
    EVA_CASE,
    PARITY,
    assert_reference,
    features,
    rounded_reference,
    tiny_entries,  # noqa: F401 - a fixture: registers the tiny zoo entries
)

import paddlemix
from paddlemix.convert import main
from paddlemix.models import CLIP
from paddlemix.zoo.download import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> int:
    return main([str(a) for a in args])


def header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])


def source_model(case: Path):
    return paddlemix.create_model(case / "model_config.json", pretrained=case / "pytorch_model.bin")


def test_fp32_round_trip_is_identical_to_the_source_and_matches_torch(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert run("--src", CLIP_CASE / "pytorch_model.bin", "--model", CLIP_CASE / "model_config.json",
               "--out", out, "--dtype", "fp32") == 0
    report = json.loads(capsys.readouterr().out)
    loaded = CLIP.from_pretrained(str(out))
    for got, want in zip(features(loaded, CLIP_CASE), features(source_model(CLIP_CASE), CLIP_CASE)):
        np.testing.assert_array_equal(got, want)
    assert_reference(loaded, CLIP_CASE)  # open_clip's own outputs, computed in torch
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["files"] == manifest["files"]
    for name, record in manifest["files"].items():
        assert record == {"sha256": file_sha256(out / name), "size": (out / name).stat().st_size}
    assert (manifest["dtype"], manifest["layout"]) == ("fp32", "open_clip")
    check = manifest["verification"]
    assert check["passed"] is True
    assert check["paddle_source"]["image_features_max_abs_diff"] == 0.0
    assert check["paddle_source"]["text_features_max_abs_diff"] == 0.0
    assert check["torch_open_clip"].startswith("skipped")  # torch is not a dependency
    config = json.loads((out / "config.json").read_text())
    assert config["preprocess_cfg"] == {}  # --model gave none: the factory's OpenAI defaults apply


def test_fp16_output_holds_the_rounded_weights_exactly(tmp_path, capsys):
    out16, out32 = tmp_path / "fp16", tmp_path / "fp32"
    for out, dtype in ((out16, "fp16"), (out32, "fp32")):
        assert run("--src", CLIP_CASE / "model.safetensors", "--model", CLIP_CASE / "model_config.json",
                   "--out", out, "--dtype", dtype, "--no-verify") == 0
    capsys.readouterr()
    assert {v["dtype"] for k, v in header(out16 / "model.safetensors").items() if k != "__metadata__"} == {"F16"}
    size16, size32 = (o.joinpath("model.safetensors").stat().st_size for o in (out16, out32))
    assert size16 < 0.51 * size32
    loaded = CLIP.from_pretrained(str(out16))
    for got, want in zip(features(loaded, CLIP_CASE), features(rounded_reference(CLIP_CASE, "float16"), CLIP_CASE)):
        np.testing.assert_array_equal(got, want)
    assert_reference(loaded, CLIP_CASE, atol=5e-3)
    assert "verification" not in json.loads((out16 / "manifest.json").read_text())


def test_eva_clip_checkpoint_to_bf16(tmp_path, capsys):
    out = tmp_path / "eva"
    assert run("--src", EVA_CASE / "pytorch_model.bin", "--model", EVA_CASE / "model_config.json",
               "--out", out, "--dtype", "bf16") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "eva" and report["verification"]["paddle_source"]["image_features_min_cosine"] > 0.999
    assert header(out / "model.safetensors")["visual.class_embedding"]["dtype"] == "BF16"
    loaded = CLIP.from_pretrained(str(out))
    for got, want in zip(features(loaded, EVA_CASE), features(rounded_reference(EVA_CASE, "bfloat16"), EVA_CASE)):
        np.testing.assert_array_equal(got, want)


def test_source_directories_carry_their_own_config(tmp_path, capsys):
    """An HF transformers directory and a PaddleMIX one need no --model."""
    hf = PARITY / "hf_clip"
    assert run("--src", hf, "--out", tmp_path / "hf", "--dtype", "fp32") == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "hf"
    assert_reference(CLIP.from_pretrained(str(tmp_path / "hf")), hf)
    legacy = Path(__file__).parent / "fixtures" / "paddlemix_legacy" / "eva02_meanpool"  # written by PaddleMIX
    assert run("--src", legacy, "--out", tmp_path / "from-paddlemix", "--dtype", "fp32") == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "paddlemix_legacy"
    assert_reference(CLIP.from_pretrained(str(tmp_path / "from-paddlemix")), legacy)


def test_preprocessing_flags_reach_the_transforms(tmp_path, capsys):
    out = tmp_path / "pp"
    assert run("--src", CLIP_CASE / "model.safetensors", "--model", CLIP_CASE / "model_config.json", "--out", out,
               "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--interpolation", "bilinear",
               "--resize-mode", "squash", "--no-verify") == 0
    model, _, preprocess = paddlemix.create_model_and_transforms(out)
    assert paddlemix.get_model_preprocess_cfg(model) == {
        "size": (32, 32), "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
        "resize_mode": "squash", "fill_color": 0}
    from PIL import Image

    image = np.asarray(preprocess(Image.new("RGB", (64, 48), (255, 128, 0))))
    np.testing.assert_allclose(image[:, 0, 0], [2.0, (128 / 255 - 0.5) / 0.25, -2.0], rtol=0, atol=1e-5)


def test_a_wrong_architecture_fails_and_writes_nothing(tmp_path, caplog):
    wrong = json.loads((CLIP_CASE / "model_config.json").read_text())
    wrong["vision_cfg"]["layers"] = 3
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    out = tmp_path / "out"
    assert run("--src", CLIP_CASE / "model.safetensors", "--model", tmp_path / "wrong.json", "--out", out) == 1
    assert "missing weights ['visual.transformer.blocks.2." in caplog.text
    assert "nothing was written" in caplog.text
    assert list(tmp_path.iterdir()) == [tmp_path / "wrong.json"]  # no output, no temporary directory


def test_existing_output_needs_overwrite(tmp_path, caplog, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--src", CLIP_CASE / "model.safetensors", "--model", CLIP_CASE / "model_config.json", "--out", out,
            "--no-verify"]
    assert run(*args) == 1
    assert "already exists" in caplog.text and (out / "keep.txt").read_text() == "mine"
    assert run(*args, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "model.safetensors"]


def test_torch_check_is_optional_and_can_be_required(tmp_path, caplog, capsys):
    """torch is not a dependency: '--torch require' fails cleanly without it, and runs the check with it."""
    have_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))
    code = run("--src", CLIP_CASE / "pytorch_model.bin", "--model", CLIP_CASE / "model_config.json",
               "--out", tmp_path / "o", "--dtype", "fp32", "--torch", "require")
    if have_torch:
        assert code == 0
        torch_check = json.loads(capsys.readouterr().out)["verification"]["torch_open_clip"]
        assert torch_check["image_features_max_abs_diff"] < 1e-4
    else:
        assert code == 1
        assert "torch and open_clip are not importable" in caplog.text
        assert not (tmp_path / "o").exists()


def test_module_entry_point_end_to_end(tmp_path):
    """The real command line, in a fresh interpreter, as a user runs it."""
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MKL_DEBUG_CPU_TYPE="5")
    proc = subprocess.run(
        [sys.executable, "-m", "paddlemix.convert", "--src", str(CLIP_CASE / "pytorch_model.bin"),
         "--model", str(CLIP_CASE / "model_config.json"), "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["dtype"] == "fp16" and report["verification"]["passed"] is True
    assert report["source"]["path"] == str((CLIP_CASE / "pytorch_model.bin").resolve())
    assert_reference(CLIP.from_pretrained(str(out)), CLIP_CASE, atol=5e-3)


def test_a_zoo_name_as_model_gives_architecture_and_preprocessing(tiny_entries, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "zoo"
    assert run("--src", CLIP_CASE / "model.safetensors", "--model", "tiny-CLIP-laion", "--out", out) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["passed"] is True
    assert json.loads((out / "config.json").read_text())["preprocess_cfg"] == {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}
