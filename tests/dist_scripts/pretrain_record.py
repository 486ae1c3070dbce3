"""run_pretrain_dist.py, recording which dataset entries this rank loaded (for disjointness tests).

Usage: same flags as examples/clip/run_pretrain_dist.py plus the env var PADDLEMIX_TEST_RECORD_DIR;
each rank appends the entry indices it loaded to <dir>/rank<k>.txt. PADDLEMIX_TEST_STOP_AT=k stops
training after step k, as an interruption would (the schedule stays that of the full run).
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

import paddle.distributed as dist  # noqa: E402

from paddlemix.data.sources.mapstyle import CaptionListDataset  # noqa: E402
from paddlenlp.trainer import TrainerCallback  # noqa: E402

from paddlemix.train import trainer as trainer_module  # noqa: E402
from paddlemix.train.pretrain import main  # noqa: E402

_original_load = CaptionListDataset.load


def _recording_load(self, i):
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(os.environ["PADDLEMIX_TEST_RECORD_DIR"]) / f"rank{rank}.txt"
    with open(out, "a") as f:
        f.write(f"{i}\n")
    return _original_load(self, i)


CaptionListDataset.load = _recording_load


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


if os.environ.get("PADDLEMIX_TEST_STOP_AT"):
    _original_init = trainer_module.CLIPTrainer.__init__

    def _init_with_stop(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        self.add_callback(_StopAt(int(os.environ["PADDLEMIX_TEST_STOP_AT"])))

    trainer_module.CLIPTrainer.__init__ = _init_with_stop

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
