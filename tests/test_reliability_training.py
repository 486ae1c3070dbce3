"""Faults during training never lose work.

- A checkpoint exists only once complete: a process killed mid-save leaves no ``checkpoint-N``
  (only a hidden staging folder nothing loads), and the run resumes from the previous one with
  the losses of the uninterrupted run.
- A full disk during a save is a clear error that keeps the previous checkpoint intact (a real
  small tmpfs when this process may mount one, else writes that fail with ENOSPC).
- In a 2-process run, a rank killed with SIGKILL makes ``paddle.distributed.launch`` exit
  non-zero within seconds (measured), and resuming continues with the same losses (slow).

Training subprocesses run tests/dist_scripts/pretrain_faults.py, i.e. examples/clip/run_pretrain_dist.py
with faults injected by environment variables, on the demo data and tests/fixtures/train/tiny_clip.json.
"""
import contextlib
import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from paddlemix.train.checkpointing import (
    CheckpointSaveError,
    last_complete_checkpoint,
    staged_checkpoint,
    staging_path,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json"
FAULTS = ROOT / "tests" / "dist_scripts" / "pretrain_faults.py"
# What a complete single-process checkpoint of this Trainer holds.
CHECKPOINT_FILES = {"config.json", "model.safetensors", "optimizer.pdopt", "rng_state.pth", "scheduler.pdparams",
                    "trainer_state.json", "training_args.bin"}


def _tree_digest(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------
# The staging protocol on its own
# ---------------------------------------------------------------------------------------------------

def test_checkpoint_appears_only_when_complete_and_replaces_a_previous_run(tmp_path):
    run_dir = tmp_path / "out"
    (run_dir / "checkpoint-4").mkdir(parents=True)
    (run_dir / "checkpoint-4" / "old.bin").write_bytes(b"previous run")
    stale = Path(staging_path(str(run_dir), "checkpoint-2"))  # left by a save killed earlier
    (stale / "checkpoint-2").mkdir(parents=True)
    with staged_checkpoint(str(run_dir), "checkpoint-4", publisher=True) as root:
        target = Path(root) / "checkpoint-4"
        target.mkdir()
        (target / "weights.bin").write_bytes(b"new")
        # mid-save: the previous run's checkpoint-4 is untouched and the new one is invisible
        assert sorted(p.name for p in (run_dir / "checkpoint-4").iterdir()) == ["old.bin"]
    assert sorted(p.name for p in (run_dir / "checkpoint-4").iterdir()) == ["weights.bin"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-4"]  # staging and stale staging gone
    assert last_complete_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-4")


@pytest.mark.parametrize("failure, fragments", [
    (OSError(errno.ENOSPC, "No space left on device"), ["is full", "No space left on device", "save_total_limit"]),
    # writers re-raise I/O errors as their own types; the disk-full cause is found in the chain
    ("chained", ["is full", "save_total_limit"]),
    (OSError(errno.EACCES, "Permission denied"), ["PermissionError", "Permission denied", "Fix the cause"]),
])
def test_failed_save_removes_the_partial_checkpoint_and_names_the_one_kept(tmp_path, failure, fragments):
    run_dir = tmp_path / "out"
    (run_dir / "checkpoint-2").mkdir(parents=True)
    (run_dir / "checkpoint-2" / "weights.bin").write_bytes(b"complete")
    with pytest.raises(CheckpointSaveError) as info:
        with staged_checkpoint(str(run_dir), "checkpoint-4", publisher=True) as root:
            (Path(root) / "checkpoint-4").mkdir()
            (Path(root) / "checkpoint-4" / "weights.bin").write_bytes(b"half")
            if failure == "chained":
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError as e:
                    raise RuntimeError("Error while serializing") from e
            raise failure
    message = str(info.value)
    assert "could not save checkpoint-4" in message
    assert f"last complete checkpoint {run_dir / 'checkpoint-2'} is kept" in message
    assert f"--resume_from_checkpoint {run_dir / 'checkpoint-2'}" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2"]
    assert (run_dir / "checkpoint-2" / "weights.bin").read_bytes() == b"complete"


# ---------------------------------------------------------------------------------------------------
# Full disk during a save (in-process Trainer)
# ---------------------------------------------------------------------------------------------------

def _trainer(output_dir: Path, max_steps: int, save_steps: int):
    from paddlemix.factory import create_model
    from paddlemix.train.trainer import CLIPTrainer, PreTrainingArguments, collate_batch

    model = create_model(TINY)
    model.train()
    rng = np.random.default_rng(0)
    data = [{"image": rng.standard_normal((3, 32, 32)).astype("float32"),
             "input_ids": rng.integers(1, 49407, 16)} for _ in range(8 * max_steps)]
    args = PreTrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8,
                                save_strategy="steps", save_steps=save_steps, logging_steps=1, report_to=["none"],
                                disable_tqdm=True, dataloader_num_workers=0, seed=1, save_total_limit=1)
    return CLIPTrainer(model=model, args=args, train_dataset=data, data_collator=collate_batch)


@contextlib.contextmanager
def _small_disk(path: Path, size_mb: int):
    """A tmpfs of ``size_mb`` at ``path`` when this process may mount one; yields whether it is real."""
    path.mkdir()
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, record_property):
    from paddlenlp.trainer.trainer_utils import get_last_checkpoint

    from paddlemix.zoo.checkpoint import load_state_dict

    with _small_disk(tmp_path / "disk", size_mb=64) as real_disk:
        record_property("disk", "tmpfs" if real_disk else "simulated ENOSPC")
        out = tmp_path / "disk" / "out"
        trainer = _trainer(out, max_steps=4, save_steps=2)
        snapshot = {}
        original_save = trainer._save_checkpoint

        def save_and_snapshot(model, metrics=None):
            original_save(model, metrics=metrics)
            if not snapshot:
                snapshot.update(_tree_digest(out / "checkpoint-2"))

        trainer._save_checkpoint = save_and_snapshot
        if not real_disk:  # no permission to mount: step 4's optimizer state fails to write like on a full disk
            original_write = trainer._save_ckpt_func

            def write_or_enospc(obj, path, *args, **kwargs):
                if trainer.state.global_step == 4:
                    Path(path).write_bytes(b"\0" * 1024)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                return original_write(obj, path, *args, **kwargs)

            trainer._save_ckpt_func = write_or_enospc
        # On the 64 MB disk, checkpoint-2 takes ~40 MB, so checkpoint-4 cannot be written next to it
        # (the save_total_limit=1 rotation deletes the old one only after the new one is complete).
        with pytest.raises(CheckpointSaveError) as info:
            trainer.train()
        message = str(info.value)
        kept = out / "checkpoint-2"
        assert info.value.errno == errno.ENOSPC
        assert "could not save checkpoint-4" in message and "is full" in message
        assert f"the last complete checkpoint {kept} is kept" in message
        assert f"--resume_from_checkpoint {kept}" in message and "save_total_limit" in message
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "train_log.jsonl"]
        assert get_last_checkpoint(str(out)) == str(kept)
        assert _tree_digest(kept) == snapshot and CHECKPOINT_FILES <= set(snapshot)
        assert load_state_dict(kept / "model.safetensors")["logit_scale"].shape == (1,)


# ---------------------------------------------------------------------------------------------------
# Killed processes (subprocess runs of the real training script)
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from paddlemix.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_train=512, num_eval_per_class=4, image_size=32)
    return root


def _flags(demo_root, out, max_steps, save_steps, extra=()):
    return [
        "--model", str(TINY), "--task_name", "demo", "--data_root", str(demo_root), "--output_dir", str(out),
        "--max_steps", str(max_steps), "--per_device_train_batch_size", "16", "--learning_rate", "5e-4",
        "--warmup_steps", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(save_steps),
        "--dataloader_num_workers", "0", "--seed", "7", "--disable_tqdm", "true", "--report_to", "none",
        "--overwrite_output_dir", "true", "--do_train", "true", *extra,
    ]


def _env(fault_dir, **faults):
    env = dict(os.environ, MKL_DEBUG_CPU_TYPE="5", PYTHONPATH=str(ROOT), PADDLEMIX_FAULT_DIR=str(fault_dir))
    env.update({f"PADDLEMIX_FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    return env


def _losses(out_dir: Path):
    """Per-step losses from train_log.jsonl (a resumed run's entries come later and win)."""
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}


def _tail(res):
    return res.stdout[-3000:], res.stderr[-3000:]


def test_process_killed_mid_save_leaves_no_checkpoint_and_resume_is_exact(demo_root, tmp_path):
    from paddlenlp.trainer.trainer_utils import get_last_checkpoint

    out = tmp_path / "out"
    crashed = subprocess.run([sys.executable, str(FAULTS), *_flags(demo_root, out, 4, 2)], cwd=ROOT,
                             env=_env(tmp_path, kill_in_save=4), capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -9, _tail(crashed)  # SIGKILL after checkpoint-4's weights, before its optimizer
    partial = Path(staging_path(str(out), "checkpoint-4")) / "checkpoint-4"
    assert (partial / "model.safetensors").is_file() and not (partial / "optimizer.pdopt").exists()
    assert not (out / "checkpoint-4").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")  # what --resume_from_checkpoint true picks
    assert CHECKPOINT_FILES <= {p.name for p in (out / "checkpoint-2").iterdir()}
    before = _losses(out)
    assert sorted(before) == [1, 2, 3, 4]  # step 4 was logged before its save started

    # A new process, as after a real crash (PaddleNLP keys optimizer state by per-process parameter names).
    resumed = subprocess.run([sys.executable, str(FAULTS), *_flags(demo_root, out, 4, 2, [
        "--resume_from_checkpoint", str(out / "checkpoint-2")])], cwd=ROOT, env=_env(tmp_path), capture_output=True,
        text=True, timeout=600)
    assert resumed.returncode == 0, _tail(resumed)
    after = _losses(out)
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], abs=1e-5), (step, before, after)
    assert CHECKPOINT_FILES <= {p.name for p in (out / "checkpoint-4").iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # the dead save's staging is gone


@pytest.mark.slow
def test_killed_rank_stops_the_launcher_within_seconds_and_resume_continues(demo_root, tmp_path, record_property):
    """~2 min under load: two 2-process runs. Paddle's launcher (default --elastic_level -1) stops the
    other ranks and exits as soon as one rank dies; rank 0, blocked in a gloo collective, is stopped."""
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2"]
    killed = subprocess.run([*launch, "--log_dir", str(tmp_path / "logs_killed"), str(FAULTS),
                             *_flags(demo_root, out, 12, 6)], cwd=ROOT, env=_env(tmp_path, kill_rank=1, kill_step=10),
                            capture_output=True, text=True, timeout=600)
    exited = time.time()
    delay = exited - float((tmp_path / "killed_at.txt").read_text())
    record_property("launcher_exit_after_kill_s", round(delay, 2))
    assert killed.returncode != 0, _tail(killed)
    assert 0 < delay < 30, delay
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-6", "train_log.jsonl"]
    assert {"model.safetensors", "optimizer.pdopt", "scheduler.pdparams", "trainer_state.json"} <= {
        p.name for p in (out / "checkpoint-6").iterdir()}
    before = _losses(out)
    assert max(before) >= 9  # rank 0 logged up to the step before the kill

    resumed = subprocess.run([*launch, "--log_dir", str(tmp_path / "logs_resumed"), str(FAULTS),
                              *_flags(demo_root, out, 12, 6, ["--resume_from_checkpoint", str(out / "checkpoint-6")])],
                             cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, _tail(resumed)
    after = _losses(out)
    assert sorted(after) == list(range(1, 13))
    for step in range(7, max(before) + 1):
        assert after[step] == pytest.approx(before[step], abs=1e-5), (step, before, after)
