"""Training settings are checked before anything is built: one line naming the flag and the fix.

Also: a recipe JSON followed by flags (flags win), and train_log.jsonl holding each step once
after a resume. All in-process through paddlemix.train.pretrain.main / parse_args.
"""
import json
import types
from pathlib import Path

import pytest

from paddlemix.train.pretrain import main, parse_args
from paddlemix.train.settings import TrainingSettingError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json"


def _flags(tmp_path, *extra):
    return ["--model", str(TINY), "--task_name", "demo", "--data_root", str(tmp_path / "demo"),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none", *extra]


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return lines[-1]


@pytest.mark.parametrize("flags, fragment", [
    (["--per_device_train_batch_size", "-4"], "--per_device_train_batch_size=-4 must be a positive integer"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size=0 must be a positive integer"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps=0 must be a positive integer"),
    (["--logging_steps", "0"], "--logging_steps=0 must be a positive integer"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers=-1 must be 0"),
    (["--max_steps", "0"], "--max_steps=0 must be a positive number of steps, or -1"),
    (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs=0.0 must be > 0"),
    (["--learning_rate", "-0.1"], "--learning_rate=-0.1 must be a number >= 0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio=1.5 must be in [0, 1]"),
    (["--min_lr", "0.1", "--learning_rate", "0.01"], "--min_lr=0.1 is above --learning_rate=0.01"),
    (["--max_skip_fraction", "2"], "--max_skip_fraction=2.0 must be in [0, 1]"),
    (["--sharding", "stage2"], "--sharding stage2 needs a GPU"),
    (["--sharding", "stage3"], "on CPU use --sharding stage1"),
    (["--tensor_parallel_degree", "2"], "need 2 processes; start them with python -m paddle.distributed.launch"),
])
def test_a_bad_setting_is_one_line_naming_the_flag_before_the_model_is_built(tmp_path, capsys, flags, fragment):
    assert main(_flags(tmp_path, *flags)) == 2
    line = _error_line(capsys)
    assert line.startswith("error: --") and fragment in line, line
    assert not (tmp_path / "demo").exists()  # nothing was built, not even the data


def test_a_read_only_output_dir_is_refused_before_the_model_is_built(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    flags = _flags(tmp_path)
    flags[flags.index("--output_dir") + 1] = str(blocker / "out")
    assert main(flags) == 2
    line = _error_line(capsys)
    assert f"--output_dir {blocker / 'out'} is not writable" in line and "choose a folder" in line
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--tensor_parallel_degree", "3"], "--tensor_parallel_degree 3 x --pipeline_parallel_degree 1 = 3 does not "
                                        "divide the 4 processes of this job"),
    (["--sharding", "stage1", "--sharding_parallel_degree", "3"], "--sharding_parallel_degree 3 x tensor x pipeline "
                                                                  "degree 1 = 3 does not divide the 4 processes"),
])
def test_degrees_that_do_not_divide_the_world_size_are_refused(tmp_path, monkeypatch, flags, fragment):
    # what paddle.distributed.launch announces to each of 4 processes; no process group is made
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "4")
    monkeypatch.setenv("PADDLE_TRAINER_ID", "0")
    with pytest.raises(TrainingSettingError, match=fragment.replace("[", r"\[")):
        parse_args(_flags(tmp_path, *flags))


def test_flags_after_a_recipe_override_its_keys(tmp_path):
    recipe = json.loads((ROOT / "configs" / "train" / "demo.json").read_text())
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    model_args, data_args, args = parse_args([str(path), "--task_name", "/data/train.jsonl",
                                              "--num_train_epochs", "30", "--overwrite_output_dir", "false",
                                              "--output_dir", str(tmp_path / "out")])
    assert data_args.task_name == "/data/train.jsonl"
    assert args.num_train_epochs == 30 and args.overwrite_output_dir is False
    # the keys not overridden keep the recipe's values
    assert model_args.model == recipe["model"]
    assert args.learning_rate == recipe["learning_rate"] and args.warmup_steps == recipe["warmup_steps"]
    assert args.per_device_train_batch_size == recipe["per_device_train_batch_size"]
    assert args.dataloader_num_workers == recipe["dataloader_num_workers"] and args.do_train is True
    # the recipe alone is what it says
    _, data_alone, args_alone = parse_args([str(path)])
    assert data_alone.task_name == "demo" and args_alone.num_train_epochs == recipe["num_train_epochs"]


def test_an_unknown_recipe_key_is_named_with_the_closest_flag(tmp_path, capsys):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"model": "CLIP-tiny-demo", "learnig_rate": 0.1}))
    assert main([str(path), "--max_steps", "1"]) == 2
    assert "has unknown keys: 'learnig_rate' (did you mean 'learning_rate'?)" in _error_line(capsys)


def test_train_log_holds_each_step_once_after_a_resume(tmp_path):
    """A run killed after logging step 8 and resumed from checkpoint-6 logs 7 and 8 again."""
    from paddlemix.train.trainer import _TrainLogFromStart

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9)))
    trainer = types.SimpleNamespace(train_log_path=str(log), is_world_process_zero=lambda: True)
    _TrainLogFromStart(trainer).on_train_begin(None, types.SimpleNamespace(global_step=6), None)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
