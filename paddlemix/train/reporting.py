"""What a training run reports besides the loss: model scalars, skip counts, VisualDL, training curves.

``install_reporting(trainer)`` is all the Trainer needs to call: it swaps PaddleNLP's VisualDL
callback (when ``--report_to visualdl``, PaddleNLP's default) for one whose hyper-parameter record
VisualDL accepts, and draws ``train_curves.png`` from ``train_log.jsonl`` when training ends.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Iterable, List

from paddlenlp.trainer import TrainerCallback
from paddlenlp.trainer.integrations import VisualDLCallback as _PaddleNLPVisualDLCallback

logger = logging.getLogger(__name__)

__all__ = ["TrainCurvesCallback", "VisualDLCallback", "install_reporting", "training_scalars", "visualdl_hparams"]

# The scalars VisualDL's hyper-parameter view lines up against each run (tags as the callback writes them).
HPARAM_METRICS = ["train/loss", "eval/acc1", "eval/acc5"]
# Every logged step, one JSON object a line, in the output directory (written by the Trainer).
TRAIN_LOG_NAME = "train_log.jsonl"


def training_scalars(model, skip_counters: Iterable[Any] = ()) -> Dict[str, float]:
    """``logit_scale`` (the multiplier, not its log), ``logit_bias`` (sigmoid-loss models) and skip counts.

    Skip counts are totals so far on this rank: ``skipped_samples`` and one ``skipped_<reason>``
    per reason that occurred (the reasons of ``paddlemix.data.sources.SKIP_REASONS``).
    """
    out: Dict[str, float] = {}
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        out["logit_scale"] = round(math.exp(float(scale.item())), 4)
    bias = getattr(model, "logit_bias", None)
    if bias is not None:
        out["logit_bias"] = round(float(bias.item()), 4)
    counters = [c for c in skip_counters if c is not None and hasattr(c, "counts")]
    if counters:
        by_reason: Dict[str, int] = {}
        for counter in counters:
            for reason, n in counter.counts.items():
                by_reason[reason] = by_reason.get(reason, 0) + int(n)
        out["skipped_samples"] = sum(by_reason.values())
        out.update({f"skipped_{reason}": n for reason, n in sorted(by_reason.items())})
    return out


def visualdl_hparams(args) -> Dict[str, Any]:
    """TrainingArguments as VisualDL's hparams record takes them: int, float or str values only.

    PaddleNLP hands over ``to_sanitized_dict()``, which keeps booleans; VisualDL stores a ``bool``
    in the record's ``int_value`` (``bool`` is an ``int``), which protobuf >= 4 rejects
    ("Expected an int, got a boolean"). Booleans become "True"/"False", unset values are left out.
    """
    clean: Dict[str, Any] = {}
    for key, value in args.to_sanitized_dict().items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            value = str(value)
        clean[key] = value
    return clean


class VisualDLCallback(_PaddleNLPVisualDLCallback):
    """PaddleNLP's VisualDL logger whose hyper-parameter record VisualDL accepts (see ``visualdl_hparams``)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.vdl_writer is None:
            self._init_summary_writer(args)
        if self.vdl_writer is None:
            return
        self.vdl_writer.add_text("args", args.to_json_string())
        self.vdl_writer.add_hparams(visualdl_hparams(args), metrics_list=list(HPARAM_METRICS))


class TrainCurvesCallback(TrainerCallback):
    """Draw ``train_curves.png`` from ``train_log.jsonl`` in the output directory when training ends."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_train_curves(args.output_dir)


def write_train_curves(output_dir: str):
    """``OUTPUT_DIR/train_curves.png`` from ``OUTPUT_DIR/train_log.jsonl``; None when there is no log yet."""
    from ..eval.plots import plot_train_curves

    log = os.path.join(output_dir, TRAIN_LOG_NAME)
    if not os.path.isfile(log):
        return None
    path = plot_train_curves(log, os.path.join(output_dir, "train_curves.png"))
    logger.info("wrote %s", path)
    return path


def install_reporting(trainer) -> None:
    """Replace PaddleNLP's VisualDL callback (if ``report_to`` has it) and add the curves callback."""
    handler = trainer.callback_handler
    callbacks: List[Any] = handler.callbacks
    for i, cb in enumerate(callbacks):
        if type(cb) is _PaddleNLPVisualDLCallback:
            callbacks[i] = VisualDLCallback(cb.vdl_writer)
    trainer.add_callback(TrainCurvesCallback())
