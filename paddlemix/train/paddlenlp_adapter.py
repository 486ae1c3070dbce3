"""The one place that touches private members of PaddleNLP's Trainer (pinned: paddlenlp 3.0.0b4, a beta).

:class:`~paddlemix.train.trainer.CLIPTrainer` customises the Trainer through its public surface:
``compute_loss``, ``create_optimizer``, ``create_scheduler``, ``get_train_dataloader``,
``save_model``, ``log``, ``evaluate`` and ``TrainerCallback`` s. Three needs have no public hook.
:class:`PaddleNLPTrainerAdapter` meets them with the private members below and hands each to a
public method of its own, which the CLIP trainer implements:

``_load_from_checkpoint(resume_from_checkpoint)`` (overridden; :meth:`load_model_weights` goes first)
    PaddleNLP resumes model weights from ``model_state.pdparams`` only and raises when that file
    is missing, before any callback runs; our checkpoints hold ``model.safetensors`` (what
    ``CLIP.save_pretrained`` writes). Optimizer, scheduler and RNG state still come from
    PaddleNLP's own files.
``_save_checkpoint(model, metrics)`` (overridden; wraps PaddleNLP's own in a staging folder)
    A checkpoint must appear only once complete (:mod:`paddlemix.train.checkpointing`). PaddleNLP
    derives every path of a checkpoint from ``args.output_dir`` / ``args.output_signal_dir`` and
    fires ``on_save`` only after the files are written, so for the duration of its call both point
    at the staging root (:func:`output_dir_redirected`, restored on any error).
``_rotate_checkpoints(use_mtime, output_dir)`` (called)
    PaddleNLP rotates inside the staging root, where nothing is to be deleted; the new checkpoint
    counts towards ``save_total_limit`` once it is published, so rotation runs again in the run folder.
``_wrap_model(model, training)`` (overridden; :meth:`wrap_model_for_training` goes first)
    Tensor parallelism with the project's own split layers: fleet's ``TensorParallel`` wrapper,
    which PaddleNLP applies, broadcasts every batch with a GPU-only op.

``tests/test_paddlenlp_adapter.py`` checks each of these still exists with these parameters and is
still called where this class relies on it, so a PaddleNLP upgrade fails there, by name, rather
than silently skipping a hook.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import paddle.distributed as dist
from paddlenlp.trainer import Trainer, TrainingArguments
from paddlenlp.trainer.trainer_utils import get_last_checkpoint

from .checkpointing import staged_checkpoint

__all__ = ["PaddleNLPTrainerAdapter", "output_dir_redirected", "PRIVATE_MEMBERS"]

logger = logging.getLogger(__name__)

# Private Trainer methods used here -> their parameters in the pinned PaddleNLP (checked by the tests).
PRIVATE_MEMBERS = {
    "_load_from_checkpoint": ("self", "resume_from_checkpoint"),
    "_save_checkpoint": ("self", "model", "metrics"),
    "_rotate_checkpoints": ("self", "use_mtime", "output_dir"),
    "_wrap_model": ("self", "model", "training"),
}


@contextlib.contextmanager
def output_dir_redirected(args: TrainingArguments, root: str) -> Iterator[None]:
    """Point ``args.output_dir`` (and ``output_signal_dir`` where it is the same folder, its default)
    at ``root`` meanwhile; both are restored however the block ends."""
    run_dir, signal_dir = args.output_dir, args.output_signal_dir
    args.output_dir = root
    if signal_dir == run_dir:
        args.output_signal_dir = root
    try:
        yield
    finally:
        args.output_dir, args.output_signal_dir = run_dir, signal_dir


class PaddleNLPTrainerAdapter(Trainer):
    """PaddleNLP's Trainer with the private overrides listed in the module docstring, and nothing else."""

    # ------------------------------------------------------------------ hooks for subclasses
    def load_model_weights(self, checkpoint: str) -> bool:
        """Load the model weights of ``checkpoint`` if they are in a format this trainer writes.

        False leaves resuming to PaddleNLP (``model_state.pdparams``).
        """
        return False

    def wrap_model_for_training(self, model, training: bool):
        """The model to train (or evaluate) instead of PaddleNLP's wrapping, or None for PaddleNLP's."""
        return None

    # ------------------------------------------------------------------ private overrides
    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        ckpt = resume_from_checkpoint
        if isinstance(ckpt, bool) and ckpt:
            ckpt = get_last_checkpoint(self.args.output_dir)
        if isinstance(ckpt, str) and self.load_model_weights(ckpt):
            return
        super()._load_from_checkpoint(resume_from_checkpoint)

    def _wrap_model(self, model, training=True):
        wrapped = self.wrap_model_for_training(model, training)
        return super()._wrap_model(model, training) if wrapped is None else wrapped

    def _save_checkpoint(self, model, metrics=None):
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        barrier = dist.barrier if self.args.world_size > 1 else (lambda: None)
        with staged_checkpoint(run_dir, name, publisher=self.args.local_rank <= 0, barrier=barrier) as root:
            with output_dir_redirected(self.args, root):
                super()._save_checkpoint(model, metrics=metrics)
            staged = os.path.join(root, name)
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = os.path.join(run_dir, name)
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if self.args.local_rank <= 0:
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
