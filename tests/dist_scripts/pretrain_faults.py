"""run_pretrain_dist.py with injected faults, for tests/test_reliability_training.py.

Same flags as examples/clip/run_pretrain_dist.py. Faults, chosen by environment variables so the
launcher passes them to every rank unchanged:

- PADDLEMIX_FAULT_KILL_RANK=r and PADDLEMIX_FAULT_KILL_STEP=k: rank r SIGKILLs itself at the end of
  step k (after the optimizer step, before logging and saving), first writing the wall-clock time
  to $PADDLEMIX_FAULT_DIR/killed_at.txt so the test can measure how long the launcher takes to exit.
- PADDLEMIX_FAULT_KILL_IN_SAVE=k: the process SIGKILLs itself while checkpoint-k is being written,
  right after the model weights were saved and before the optimizer state is.
"""
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

import paddle.distributed as dist  # noqa: E402
from paddlenlp.trainer import TrainerCallback  # noqa: E402

from paddlemix.train import trainer as trainer_module  # noqa: E402
from paddlemix.train.pretrain import main  # noqa: E402


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillRankAt(TrainerCallback):
    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_end(self, args, state, control, **kwargs):
        me = dist.get_rank() if dist.is_initialized() else 0
        if me == self.rank and state.global_step == self.step:
            Path(os.environ["PADDLEMIX_FAULT_DIR"], "killed_at.txt").write_text(repr(time.time()))
            _die()


_original_init = trainer_module.CLIPTrainer.__init__


def _init_with_faults(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    if os.environ.get("PADDLEMIX_FAULT_KILL_STEP"):
        self.add_callback(_KillRankAt(int(os.environ["PADDLEMIX_FAULT_KILL_RANK"]),
                                      int(os.environ["PADDLEMIX_FAULT_KILL_STEP"])))
    if os.environ.get("PADDLEMIX_FAULT_KILL_IN_SAVE"):
        crash_step = int(os.environ["PADDLEMIX_FAULT_KILL_IN_SAVE"])
        original_save = self._save_ckpt_func

        def save_or_die(obj, path, *a, **kw):
            if self.state.global_step == crash_step and os.path.basename(path).startswith("optimizer"):
                _die()
            return original_save(obj, path, *a, **kw)

        self._save_ckpt_func = save_or_die


trainer_module.CLIPTrainer.__init__ = _init_with_faults

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
