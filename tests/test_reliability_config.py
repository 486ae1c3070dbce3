"""Bad configuration fails at once, with one message that names the problem and the fix.

Covers model configs (unknown keys, wrong types, malformed JSON), training recipes (wrong
types, bad choices), unknown model names and missing weights reached through the training
entry point, and parallel degrees that cannot work (a tensor-parallel degree that does not
divide the heads, or the world size).
"""
import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from paddlemix.factory import create_model
from paddlemix.models.config import ConfigError
from paddlemix.train.pretrain import parse_args, run
from paddlemix.train.tensor_parallel import tensor_parallelize
from paddlemix.zoo.registry import UnknownModelError

ROOT = Path(__file__).resolve().parents[1]
TINY = json.loads((ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json").read_text())


def _config(tmp_path, edit):
    """The tiny model config with ``edit(cfg)`` applied, written to a JSON file."""
    cfg = copy.deepcopy(TINY)
    edit(cfg)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    return path


def _set(section, key, value):
    def edit(cfg):
        (cfg if section is None else cfg[section])[key] = value
    return edit


# (edit, exception, fragments every message must contain: the key, the bad value, the fix)
MODEL_CONFIGS = {
    "tower_typo": (_set("vision_cfg", "widht", 64), ConfigError, ["'widht'", "did you mean 'width'?"]),
    "top_level_typo": (_set(None, "embed_dimm", 32), ConfigError, ["'embed_dimm'", "did you mean 'embed_dim'?"]),
    "unsupported_backbone": (_set("vision_cfg", "timm_model_name", "resnet50"), ConfigError,
                             ["timm_model_name='resnet50'", "use a ViT config"]),
    "width_as_string": (_set("vision_cfg", "width", "64"), ConfigError, ["VisionCfg.width", "int", "'64'"]),
    "layers_as_float": (_set("text_cfg", "layers", 2.0), ConfigError, ["TextCfg.layers", "int", "2.0"]),
    "flag_as_string": (_set(None, "quick_gelu", "yes"), ConfigError, ["quick_gelu", "bool", "'yes'"]),
    "embed_dim_as_string": (_set(None, "embed_dim", "32"), ConfigError, ["embed_dim", "int", "'32'"]),
    "logit_scale_as_string": (_set(None, "init_logit_scale", "x"), ConfigError, ["init_logit_scale", "float"]),
    "tower_not_an_object": (_set(None, "vision_cfg", [64, 2]), ConfigError, ["VisionCfg", "JSON object", "list"]),
    "heads_not_dividing_width": (_set("text_cfg", "heads", 3), ConfigError, ["text_cfg.width 64", "heads 3"]),
    "head_width_not_dividing": (_set("vision_cfg", "head_width", 48), ConfigError, ["vision_cfg.width 64",
                                                                                    "head_width 48"]),
    "bad_pool_type": (_set("vision_cfg", "pool_type", "max"), ValueError, ["pool_type", "'max'", "'tok'"]),
    "no_embed_dim": (lambda cfg: cfg.pop("embed_dim"), ConfigError, ["'embed_dim' is required"]),
}


@pytest.mark.parametrize("case", sorted(MODEL_CONFIGS))
def test_bad_model_config_names_key_and_fix(tmp_path, case):
    edit, error, fragments = MODEL_CONFIGS[case]
    with pytest.raises(error) as info:
        create_model(_config(tmp_path, edit))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("text, fragments", [
    ("{\"embed_dim\": 32,", ["is not valid JSON", "line 1"]),
    ("[1, 2]", ["must be a JSON object", "'vision_cfg'"]),
])
def test_malformed_model_config_file_names_the_file(tmp_path, text, fragments):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        create_model(path)
    assert str(path) in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_model_config_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model config {tmp_path / 'nope.json'} does not exist"):
        create_model(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------------
# Training recipes, through the training entry point
# ---------------------------------------------------------------------------------------------------

def _recipe(tmp_path, **values):
    recipe = {"model": str(ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json"), "task_name": "demo",
              "data_root": str(tmp_path / "demo"), "output_dir": str(tmp_path / "out"), "max_steps": 1,
              "report_to": "none", **values}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return str(path)


@pytest.mark.parametrize("key, value, fragment", [
    ("learning_rate", "fast", "argument --learning_rate: invalid float value: 'fast'"),
    ("max_steps", 2.5, "argument --max_steps: invalid int value: '2.5'"),
    ("per_device_train_batch_size", "many", "argument --per_device_train_batch_size: invalid int value: 'many'"),
])
def test_recipe_value_of_wrong_type_names_the_key(tmp_path, capsys, key, value, fragment):
    with pytest.raises(SystemExit) as info:
        parse_args([_recipe(tmp_path, **{key: value})])
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("key, value, fragment", [
    ("loss", "triplet", "--loss must be 'clip' or 'siglip', got 'triplet'"),
    ("optimizer", "sgd", "--optimizer must be 'adamw' or 'lamb', got 'sgd'"),
])
def test_recipe_choice_out_of_range_lists_the_choices(tmp_path, key, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_args([_recipe(tmp_path, **{key: value})])


def test_unknown_model_in_a_recipe_fails_before_training_with_close_names(tmp_path):
    args = parse_args([_recipe(tmp_path, model="ViT-B-23")])
    with pytest.raises(UnknownModelError) as info:
        run(*args)
    message = str(info.value)
    assert "unknown model 'ViT-B-23'" in message and "'ViT-B-32'" in message and "list_models()" in message
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


@pytest.mark.parametrize("pretrained", ["missing/weights.safetensors", "/no/such/dir"])
def test_missing_pretrained_path_in_a_recipe_names_the_path(tmp_path, pretrained):
    args = parse_args([_recipe(tmp_path, pretrained=pretrained)])
    with pytest.raises(FileNotFoundError) as info:
        run(*args)
    assert f"pretrained weights {pretrained} do not exist" in str(info.value)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# Parallel degrees
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("degree", [3, 4])
def test_tensor_parallel_degree_not_dividing_the_heads_is_refused_before_any_change(degree):
    model = create_model(ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json")
    before = {k: np.array(v.numpy()) for k, v in model.state_dict().items()}
    group = types.SimpleNamespace(rank=0, nranks=degree)  # the check runs before any collective
    with pytest.raises(ValueError) as info:
        tensor_parallelize(model, group, 0, degree)
    message = str(info.value)
    assert f"2 heads cannot be split evenly over tensor-parallel degree {degree}" in message
    assert "choose a degree that divides 2" in message
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key].numpy(), value, err_msg=key)


def test_tensor_parallel_degree_not_dividing_the_world_size_is_refused(tmp_path):
    """PaddleNLP checks the degrees against the launcher's world size before any process group exists."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PADDLE_TRAINERS_NUM="2", PADDLE_TRAINER_ID="0",
               PADDLE_TRAINER_ENDPOINTS="127.0.0.1:61001,127.0.0.1:61002", PADDLE_CURRENT_ENDPOINT="127.0.0.1:61001")
    code = "import sys; from paddlemix.train.pretrain import parse_args; parse_args([sys.argv[1]])"
    res = subprocess.run([sys.executable, "-c", code, _recipe(tmp_path, tensor_parallel_degree=3)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "--tensor_parallel_degree 3 x --pipeline_parallel_degree 1 = 3 does not divide the 2 processes" in res.stderr
