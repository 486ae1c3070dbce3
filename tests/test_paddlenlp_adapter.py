"""The PaddleNLP Trainer internals paddlemix relies on are still there, and only the adapter uses them.

PaddleNLP is a beta; when an upgrade renames or re-signs a private method, these tests fail by
name instead of the CLIP trainer silently losing safetensors resume, atomic checkpoints or its
tensor-parallel wrapping.
"""
import dataclasses
import inspect
import re
from pathlib import Path

import paddlenlp
import pytest
from paddlenlp.trainer import Trainer, TrainingArguments
from paddlenlp.trainer import trainer_utils

from paddlemix.train import paddlenlp_adapter, trainer as clip_trainer
from paddlemix.train.paddlenlp_adapter import PRIVATE_MEMBERS, PaddleNLPTrainerAdapter, output_dir_redirected

ROOT = Path(__file__).resolve().parents[1]
FIX = "re-check each member listed in paddlemix/train/paddlenlp_adapter.py against the new PaddleNLP"


def test_paddlenlp_is_the_pinned_version():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert paddlenlp.__version__ == pins["paddlenlp"], (
        f"paddlenlp {paddlenlp.__version__} is installed but constraints.txt pins {pins['paddlenlp']}: {FIX}, "
        f"then update the pin")


@pytest.mark.parametrize("name", sorted(PRIVATE_MEMBERS))
def test_private_members_keep_their_parameters(name):
    member = getattr(Trainer, name, None)
    assert callable(member), f"paddlenlp.trainer.Trainer.{name} is gone: {FIX}"
    params = tuple(inspect.signature(member).parameters)
    assert params == PRIVATE_MEMBERS[name], f"Trainer.{name}{params} changed from {PRIVATE_MEMBERS[name]}: {FIX}"


def _source(function) -> str:
    return inspect.getsource(function)


def test_the_trainer_still_calls_them_where_the_adapter_relies_on_it():
    train = _source(Trainer.train)
    assert "self._load_from_checkpoint(resume_from_checkpoint)" in train, FIX
    assert "self._wrap_model(self.model_wrapped)" in train, FIX
    assert "self._save_checkpoint(model, metrics=metrics)" in _source(Trainer._maybe_log_save_evaluate), FIX
    save = _source(Trainer._save_checkpoint)
    # every path of a checkpoint comes from these two arguments (what output_dir_redirected moves) ...
    assert "run_dir = self.args.output_dir" in save and "run_signal_dir = self.args.output_signal_dir" in save, FIX
    # ... and the model files are written by the public save_model (the tensor-parallel merged save)
    assert "self.save_model(output_dir)" in save, FIX
    assert "output_signal_dir" in {f.name for f in dataclasses.fields(TrainingArguments)}, FIX
    assert tuple(inspect.signature(trainer_utils.get_last_checkpoint).parameters)[0] == "folder", FIX


def _trainer_members_used(source: str):
    return {m for m in re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)", source) if hasattr(Trainer, m)}


def test_only_the_adapter_touches_private_trainer_members():
    # CLIPTrainer overrides no private Trainer method and calls none
    own = {name for name in vars(clip_trainer.CLIPTrainer) if name.startswith("_") and not name.startswith("__")}
    assert not {name for name in own if hasattr(Trainer, name)}
    assert not _trainer_members_used(inspect.getsource(clip_trainer))
    # the adapter overrides and calls exactly the members its docstring lists
    overridden = {name for name in vars(PaddleNLPTrainerAdapter) if hasattr(Trainer, name) and name.startswith("_")
                  and not name.startswith("__")}
    used = _trainer_members_used(inspect.getsource(paddlenlp_adapter))
    assert overridden | used == set(PRIVATE_MEMBERS)
    for name in PRIVATE_MEMBERS:
        assert f"``{name}(" in paddlenlp_adapter.__doc__


def test_output_dir_redirection_is_undone_however_the_save_ends(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=["none"])
    assert args.output_signal_dir == args.output_dir  # PaddleNLP's default
    with pytest.raises(RuntimeError, match="disk"):
        with output_dir_redirected(args, str(tmp_path / "stage")):
            assert args.output_dir == args.output_signal_dir == str(tmp_path / "stage")
            raise RuntimeError("disk gone")
    assert args.output_dir == args.output_signal_dir == str(tmp_path / "run")
    # a signal folder of its own stays where it is
    args.output_signal_dir = str(tmp_path / "signals")
    with output_dir_redirected(args, str(tmp_path / "stage")):
        assert (args.output_dir, args.output_signal_dir) == (str(tmp_path / "stage"), str(tmp_path / "signals"))
    assert (args.output_dir, args.output_signal_dir) == (str(tmp_path / "run"), str(tmp_path / "signals"))
