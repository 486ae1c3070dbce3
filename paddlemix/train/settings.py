"""Checks of the training settings that run before anything is built.

A bad setting found after the model is built (or at the first logging step, hours later)
costs the user the startup time, and PaddleNLP reports most of them as a bare assertion
deep in its code. Each check here names the flag, the value and the fix in one line.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Iterable, Optional

import paddle

from ..errors import PaddleMIXError

__all__ = ["TrainingSettingError", "check_data_args", "check_output_dir", "check_training_args"]


class TrainingSettingError(PaddleMIXError, ValueError):
    """A training flag or recipe key with a value the run cannot use."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TrainingSettingError(message)


def _positive_int(args, names: Iterable[str]) -> None:
    for name in names:
        value = getattr(args, name)
        _require(isinstance(value, int) and value >= 1,
                 f"--{name}={value!r} must be a positive integer; e.g. --{name} 1")


def _finite_at_least(args, name: str, low: float) -> None:
    value = getattr(args, name)
    _require(value is not None and math.isfinite(value) and value >= low,
             f"--{name}={value!r} must be a number >= {low:g}")


def _accelerator() -> Optional[str]:
    """The accelerator Paddle runs on in this process, or None on CPU."""
    device = paddle.device.get_device()
    return None if device.startswith("cpu") else device


def _world_size() -> int:
    """Processes of this job, as the launcher announces them (no process group is needed)."""
    if paddle.distributed.is_initialized():
        return paddle.distributed.get_world_size()
    return max(1, paddle.distributed.ParallelEnv().world_size)


def _check_parallel(args) -> None:
    world = _world_size()
    tp = max(args.tensor_parallel_degree, 1)
    pp = max(args.pipeline_parallel_degree, 1)
    for name in ("tensor_parallel_degree", "pipeline_parallel_degree"):
        value = getattr(args, name)
        _require(value == -1 or value >= 1, f"--{name}={value} must be a positive integer (or -1: not used)")
    sharding = str(args.sharding or "").split()
    for stage in ("stage2", "stage3"):
        if stage in sharding and _accelerator() is None:
            raise TrainingSettingError(
                f"--sharding {stage} needs a GPU (Paddle's group-sharded stage 2/3 runs on GPU, XPU and custom "
                f"devices only); on CPU use --sharding stage1, which shards the optimizer state")
    if world == 1:
        _require(tp * pp == 1,
                 f"--tensor_parallel_degree {args.tensor_parallel_degree} --pipeline_parallel_degree "
                 f"{args.pipeline_parallel_degree} need {tp * pp} processes; start them with "
                 f"python -m paddle.distributed.launch --nproc_per_node {tp * pp} ...")
        return
    _require(world % (tp * pp) == 0,
             f"--tensor_parallel_degree {tp} x --pipeline_parallel_degree {pp} = {tp * pp} does not divide the "
             f"{world} processes of this job; use degrees whose product divides {world}")
    if sharding and args.sharding_parallel_degree > 0:
        sd = args.sharding_parallel_degree
        _require(world % (tp * pp * sd) == 0,
                 f"--sharding_parallel_degree {sd} x tensor x pipeline degree {tp * pp} = {tp * pp * sd} does not "
                 f"divide the {world} processes of this job; use a sharding degree that divides {world // (tp * pp)}")


def check_training_args(args) -> None:
    """Refuse values the Trainer would fail on late or silently misuse (before PaddleNLP's own checks)."""
    _positive_int(args, ("per_device_train_batch_size", "per_device_eval_batch_size",
                         "gradient_accumulation_steps", "logging_steps", "save_steps"))
    if args.eval_steps is not None:
        _positive_int(args, ("eval_steps",))
    _require(isinstance(args.dataloader_num_workers, int) and args.dataloader_num_workers >= 0,
             f"--dataloader_num_workers={args.dataloader_num_workers!r} must be 0 (load in the training process) "
             f"or a positive number of loader processes")
    _require(args.max_steps == -1 or args.max_steps >= 1,
             f"--max_steps={args.max_steps} must be a positive number of steps, or -1 to train by --num_train_epochs")
    if args.max_steps == -1:
        _require(math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0,
                 f"--num_train_epochs={args.num_train_epochs} must be > 0 (or set --max_steps)")
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "min_lr"):
        _finite_at_least(args, name, 0.0)
    _require(args.warmup_steps >= 0, f"--warmup_steps={args.warmup_steps} must be >= 0")
    _require(0.0 <= args.warmup_ratio <= 1.0, f"--warmup_ratio={args.warmup_ratio} must be in [0, 1]")
    _require(args.min_lr <= args.learning_rate,
             f"--min_lr={args.min_lr} is above --learning_rate={args.learning_rate}; the cosine schedule "
             f"decays from --learning_rate down to --min_lr")
    _require(args.save_total_limit is None or args.save_total_limit >= 1,
             f"--save_total_limit={args.save_total_limit} must be a positive number of checkpoints to keep")
    _require(args.seed >= 0, f"--seed={args.seed} must be >= 0")
    _check_parallel(args)


def check_data_args(args) -> None:
    _require(0.0 <= args.max_skip_fraction <= 1.0,
             f"--max_skip_fraction={args.max_skip_fraction} must be in [0, 1] (e.g. 0.1: stop when over 10% of "
             f"the samples are bad)")
    _require(args.shuffle_buffer >= 0, f"--shuffle_buffer={args.shuffle_buffer} must be >= 0 (0 or 1: no shuffle)")


def check_output_dir(path: str) -> None:
    """``path`` exists or can be made, and files can be written in it (checked by writing one)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise TrainingSettingError(
            f"--output_dir {path} is not writable ({e.strerror or e}); choose a folder this user can write to"
        ) from None
