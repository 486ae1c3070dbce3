"""Every training recipe under configs/train/ parses into the script's arguments, with no unknown keys."""
import json
from pathlib import Path

import pytest

from paddlemix.train.pretrain import parse_args
from paddlemix.zoo.registry import get_model_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.json"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"demo.json", "clip_vit_l14.json", "eva02_clip_l14.json"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_names_a_registered_model(recipe, tmp_path, monkeypatch):
    raw = json.loads(recipe.read_text())
    raw["output_dir"] = str(tmp_path / "out")
    path = tmp_path / recipe.name
    path.write_text(json.dumps(raw))
    model_args, data_args, training_args = parse_args([str(path)])
    assert model_args.model == raw["model"]
    get_model_config(model_args.model)  # a registered architecture
    for key, value in raw.items():
        holder = next(a for a in (model_args, data_args, training_args) if hasattr(a, key))
        parsed = getattr(holder, key)
        parsed = getattr(parsed, "value", parsed)  # enums such as save_strategy
        # PaddleNLP normalises these for the current device count
        if key not in ("output_dir", "sharding", "sharding_parallel_degree", "tensor_parallel_degree", "report_to"):
            assert parsed == value, key


def test_unknown_recipe_key_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": "ViT-B-32", "output_dir": str(tmp_path), "learning_rat": 1e-3}))
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args([str(path)])
