"""Model configs are checked before anything is built; errors name the file, the key and the valid range."""
import copy
import json
import logging

import numpy as np
import paddle
import pytest

import paddlemix
from paddlemix.models.config import CLIPConfig, ConfigError
from paddlemix.zoo.checkpoint import save_safetensors

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 64, "heads": 2, "layers": 2},
}


def _cfg(tower, **changes):
    cfg = copy.deepcopy(TINY)
    cfg[tower].update(changes)
    return cfg


BAD = [
    (_cfg("vision_cfg", layers=-3), r"vision_cfg\.layers = -3 is out of range: it must be an integer >= 1"),
    (_cfg("vision_cfg", layers=0), r"vision_cfg\.layers = 0 is out of range"),
    (_cfg("vision_cfg", image_size=-32), r"vision_cfg\.image_size = -32 is out of range: it must be an integer >= 1"),
    (_cfg("vision_cfg", image_size=0), r"vision_cfg\.image_size = 0 is out of range"),
    (_cfg("vision_cfg", patch_size=7), r"vision_cfg\.image_size = 32 is not a multiple of vision_cfg\.patch_size = 7"),
    (_cfg("vision_cfg", width=-64), r"vision_cfg\.width = -64 is out of range"),
    (_cfg("vision_cfg", patch_dropout=1.0), r"vision_cfg\.patch_dropout = 1\.0 is out of range: it must be a number in \[0, 1\)"),
    (_cfg("vision_cfg", pool_type="max"), r"vision_cfg\.pool_type = 'max' is out of range: it must be 'tok', 'avg', 'avg_all' or 'none'"),
    (_cfg("text_cfg", context_length=-1), r"text_cfg\.context_length = -1 is out of range"),
    (_cfg("text_cfg", pad_id=512), r"text_cfg\.pad_id = 512 is out of range: it must be in \[0, vocab_size = 512\)"),
    (dict(TINY, embed_dim=-8), r"embed_dim = -8 is out of range"),
]


@pytest.mark.parametrize("cfg,message", BAD, ids=[m.split(" ")[0].replace("\\", "") for _, m in BAD])
def test_bad_config_file_is_rejected_naming_file_key_and_range(tmp_path, cfg, message):
    path = tmp_path / "bad-model.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as info:
        paddlemix.create_model(str(path))
    assert str(path) in str(info.value)
    # the same checks without a file (a dict config)
    with pytest.raises(ConfigError, match=message):
        CLIPConfig.from_model_cfg(cfg)


def test_every_registered_config_is_valid():
    for name in paddlemix.list_models():
        CLIPConfig.check_model_cfg(paddlemix.zoo.registry.get_model_config(name), source=name)


def test_bad_config_in_a_saved_model_directory_names_its_config_json(tmp_path):
    model = paddlemix.create_model(str(_write(tmp_path / "good.json", TINY)))
    model.save_pretrained(str(tmp_path / "saved"))
    config_file = tmp_path / "saved" / "config.json"
    raw = json.loads(config_file.read_text())
    raw["vision_cfg"]["layers"] = -3
    config_file.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"vision_cfg\.layers = -3 is out of range") as info:
        paddlemix.create_model(str(tmp_path / "saved"))
    assert str(config_file) in str(info.value)


def test_deeply_nested_config_json_names_the_file(tmp_path):
    model_dir = tmp_path / "deep"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConfigError, match="nests its JSON too deeply") as info:
        paddlemix.create_model(str(model_dir))
    assert str(model_dir / "config.json") in str(info.value)
    deep_file = tmp_path / "deep.json"
    deep_file.write_text('{"embed_dim": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ConfigError, match=f"{deep_file}.*nests its JSON too deeply"):
        paddlemix.create_model(str(deep_file))


def test_weights_with_nan_or_inf_load_with_one_warning_naming_them(tmp_path, caplog):
    model = paddlemix.create_model(str(_write(tmp_path / "tiny.json", TINY)))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["visual.class_embedding"] = state["visual.class_embedding"].copy()
    state["visual.class_embedding"][0] = np.nan
    state["visual.transformer.blocks.0.attn.proj.weight"] = state["visual.transformer.blocks.0.attn.proj.weight"].copy()
    state["visual.transformer.blocks.0.attn.proj.weight"][3, 1] = np.inf
    weights = tmp_path / "w.safetensors"
    save_safetensors(state, weights)
    with caplog.at_level(logging.WARNING, logger="paddlemix.zoo.loading"):
        loaded = paddlemix.create_model(str(tmp_path / "tiny.json"), pretrained=str(weights))
    records = [r for r in caplog.records if "NaN or Inf" in r.getMessage()]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "2 weight tensors" in message and "visual.class_embedding" in message and "visual.transformer.blocks.0.attn.proj.weight" in message
    assert np.isnan(loaded.visual.class_embedding.numpy()[0])
    caplog.clear()
    finite = {k: v for k, v in state.items()}
    finite["visual.class_embedding"] = np.nan_to_num(state["visual.class_embedding"])
    finite["visual.transformer.blocks.0.attn.proj.weight"] = np.nan_to_num(state["visual.transformer.blocks.0.attn.proj.weight"], posinf=0.0)
    save_safetensors(finite, weights)
    with caplog.at_level(logging.WARNING, logger="paddlemix.zoo.loading"):
        paddlemix.create_model(str(tmp_path / "tiny.json"), pretrained=str(weights))
    assert not [r for r in caplog.records if "NaN or Inf" in r.getMessage()]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_nonfinite_check_finds_nan_and_inf_in_every_float_dtype(dtype):
    from paddlemix.zoo.loading import _CHECK_SLICE, _has_nonfinite

    size = _CHECK_SLICE + 7  # a second, partial slice
    for bad in (np.nan, np.inf, -np.inf):
        values = np.linspace(-3e4, 3e4, size).astype("float32")
        assert not _has_nonfinite(paddle.to_tensor(values).astype(dtype))
        values[-1] = bad
        assert _has_nonfinite(paddle.to_tensor(values).astype(dtype)), (dtype, bad)
    assert not _has_nonfinite(paddle.to_tensor(np.arange(5)))  # integer tensors hold no NaN


def _write(path, cfg):
    path.write_text(json.dumps(cfg))
    return path

