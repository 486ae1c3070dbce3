"""The pretraining job behind ``examples/clip/run_pretrain_dist.py``: one path for every family."""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from paddlenlp.trainer import PdArgumentParser, set_seed

from .._util import run_job_rank
from ..data.sources import build_train_dataset
from ..data.transforms import image_transform
from ..factory import create_model, get_model_preprocess_cfg, get_tokenizer
from .reporting import write_train_curves
from .settings import TrainingSettingError, check_output_dir
from .trainer import CLIPTrainer, DataArguments, ModelArguments, PreTrainingArguments, collate_batch, data_world

logger = logging.getLogger(__name__)

__all__ = ["main", "parse_args", "run", "zero_shot_eval_fn"]


def _recipe_flags(recipe: str, known: Sequence[str]) -> List[str]:
    """The keys of a JSON recipe as command-line flags, so that flags given after them win."""
    try:
        with open(recipe, encoding="utf-8") as f:
            values = json.load(f)
    except OSError as e:
        raise TrainingSettingError(f"training recipe {recipe} cannot be read: {e.strerror or e}") from None
    except ValueError as e:
        raise TrainingSettingError(f"training recipe {recipe} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise TrainingSettingError(f"training recipe {recipe} must hold a JSON object of flag names and values")
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        hint = ", ".join(f"{k!r} (did you mean {v[0]!r}?)" if v else repr(k) for k, v in hints.items())
        raise TrainingSettingError(f"training recipe {recipe} has unknown keys: {hint}")
    flags: List[str] = []
    for key, value in values.items():
        if value is None:
            continue  # the flag's default
        items = value if isinstance(value, list) else [value]
        flags.append(f"--{key}")
        flags.extend(json.dumps(v) if isinstance(v, (dict, bool)) else str(v) for v in items)
    return flags


def parse_args(argv: Optional[Sequence[str]] = None):
    """Flags, or a JSON recipe (``configs/train/*.json``) followed by flags that override its keys.

    ``run_pretrain_dist.py configs/train/demo.json --task_name data.jsonl --num_train_epochs 30``
    trains with the recipe's settings except those two.
    """
    classes = (ModelArguments, DataArguments, PreTrainingArguments)
    parser = PdArgumentParser(classes)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".json") and not argv[0].startswith("-"):
        known = [f.name for cls in classes for f in dataclasses.fields(cls)]
        argv = _recipe_flags(os.path.abspath(argv[0]), known) + argv[1:]
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: a bad setting is one line naming the flag (exit status 2), not a traceback.

    In a multi-process job this does not return (see :func:`paddlemix._util.run_job_rank`).
    """
    try:
        args = parse_args(argv)
    except TrainingSettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def work() -> int:
        try:
            run(*args)
        except TrainingSettingError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    return run_job_rank(work, "training")


class _ReducingTokenizer:
    """The ``batch_encode(texts, context_length)`` interface the data sources call, reducing tokens."""

    def __init__(self, reducer):
        self.reducer = reducer

    def batch_encode(self, texts, context_length=None):
        if context_length is not None and context_length != self.reducer.length:
            raise ValueError(f"text reduction produces {self.reducer.length} tokens, not {context_length}")
        return self.reducer.batch_encode(texts)


def _eval_dir(classification_eval: str, data_root: Optional[str]) -> Path:
    if classification_eval == "demo":
        from ..data.demo import make_demo_dataset

        return make_demo_dataset(data_root).eval_root
    return Path(classification_eval)


def zero_shot_eval_fn(model, tokenizer, eval_dir: Path, batch_size: int, num_workers: int,
                      precision: str, text_model: Optional[str] = None) -> Callable[[object], Dict[str, float]]:
    """A closure that evaluates the current weights.

    The classifier is rebuilt from the trained text tower at each call, or, with ``text_model``
    (``--pretrained_text_model``), built once from that fixed model's text tower, loaded once.
    """
    from ..eval.datasets import load_classification_eval
    from ..eval.zero_shot import build_zero_shot_classifier, evaluate_zero_shot, load_text_model

    pp = get_model_preprocess_cfg(model)
    transform = image_transform(pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
                                interpolation=pp["interpolation"], resize_mode=pp["resize_mode"], output="numpy")
    eval_set = load_classification_eval(eval_dir, transform)

    fixed: Dict[str, Any] = {}
    if text_model is not None:
        fixed["model"], fixed["tokenizer"] = load_text_model(text_model, model)

    def run_eval(current_model) -> Dict[str, float]:
        if fixed and "classifier" not in fixed:  # the text model never changes: one classifier serves every eval
            fixed["classifier"] = build_zero_shot_classifier(
                fixed["model"], fixed["tokenizer"], eval_set.classnames, eval_set.templates,
                batch_size=max(batch_size, 1) * 4, precision=precision, progress=False)
        metrics = evaluate_zero_shot(current_model, tokenizer, eval_set.dataset, eval_set.classnames,
                                     eval_set.templates, batch_size=batch_size, num_workers=num_workers,
                                     precision=precision, progress=False, classifier=fixed.get("classifier"))
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    return run_eval


def run(model_args: ModelArguments, data_args: DataArguments, training_args: PreTrainingArguments) -> Dict[str, float]:
    check_output_dir(training_args.output_dir)
    set_seed(training_args.seed)
    model = create_model(
        model_args.model,
        model_args.pretrained,
        force_image_size=model_args.force_image_size,
        force_quick_gelu=model_args.force_quick_gelu,
        force_patch_dropout=model_args.force_patch_dropout,
        force_context_length=model_args.context_length,
    )
    model.train()
    if model_args.lock_image:
        model.lock_image_tower(model_args.lock_image_unlocked_groups)
    if model_args.lock_text:
        model.lock_text_tower(model_args.lock_text_unlocked_layers)
    if training_args.recompute:
        model.set_grad_checkpointing(True)
    if training_args.tensor_parallel_degree > 1:
        # Split the loaded degree-1 model before the Trainer builds the optimizer (the parallel
        # layers hold new parameters); CLIPTrainer keeps fleet's GPU-only TensorParallel wrapper out.
        from paddle.distributed import fleet

        from .tensor_parallel import tensor_parallelize

        hcg = fleet.get_hybrid_communicate_group()
        tensor_parallelize(model, hcg.get_model_parallel_group(), hcg.get_model_parallel_rank(),
                           hcg.get_model_parallel_world_size())

    tokenizer = get_tokenizer(model)
    data_tokenizer = tokenizer
    if data_args.text_reduction:
        # CLIPA: captions reduced to the model's (short) context; image-side reduction is
        # --force_image_size (the train transform then produces that size) and --force_patch_dropout.
        from ..data.token_reduction import TextTokenReducer

        data_tokenizer = _ReducingTokenizer(
            TextTokenReducer(tokenizer, model.context_length, data_args.text_reduction, seed=training_args.seed)
        )
    pp = get_model_preprocess_cfg(model)
    train_transform = image_transform(pp["size"], is_train=True, mean=pp["mean"], std=pp["std"],
                                      interpolation=pp["interpolation"], output="numpy")
    rank, world, _ = data_world(training_args)
    train_dataset = build_train_dataset(
        data_args.task_name,
        train_transform,
        data_tokenizer,
        data_root=data_args.data_root,
        image_root=data_args.image_root,
        context_length=model.context_length,
        rank=rank,
        world_size=world,
        seed=training_args.seed,
        image_key=data_args.image_key,
        caption_key=data_args.caption_key,
        separator=data_args.csv_separator,
        shuffle_buffer=data_args.shuffle_buffer,
        max_skip_fraction=data_args.max_skip_fraction,
    )

    eval_fn = None
    if data_args.classification_eval:
        precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
        eval_fn = zero_shot_eval_fn(model, tokenizer, _eval_dir(data_args.classification_eval, data_args.data_root),
                                    training_args.per_device_eval_batch_size,
                                    training_args.dataloader_num_workers, precision,
                                    text_model=model_args.pretrained_text_model)

    trainer = CLIPTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collate_batch,
        eval_fn=eval_fn,
        skip_counters=[getattr(train_dataset, "skips", None)],
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = dict(result.metrics)
    if eval_fn is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir) / "train_results.json"
        out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        write_train_curves(training_args.output_dir)  # again, now with the final evaluation
        logger.info("results: %s", json.dumps(metrics, sort_keys=True))
    return metrics
