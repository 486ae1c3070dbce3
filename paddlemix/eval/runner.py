"""``examples/clip/run_zero_shot_eval.py``: zero-shot classification, retrieval and STS from the command line.

Flags follow PaddleMIX's script (``--model``, ``--pretrained``, ``--classification_eval``,
``--per_device_eval_batch_size``, ``--dataloader_num_workers``, ``--fp16`` / ``--bf16``,
``--output_dir``) plus ``--retrieval_eval`` and ``--sts_eval``. Launch with
``python -m paddle.distributed.launch`` to split the data over devices.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import paddle

from .._util import run_job_rank
from ..factory import create_model_and_transforms, get_tokenizer
from .datasets import RetrievalDataset, load_classification_eval
from .pages import render_reports, save_classification, save_retrieval
from .report import format_table, make_record, write_evaluation_files
from .retrieval import evaluate_retrieval, retrieval_features, retrieval_rankings
from .sts import evaluate_sts
from .zero_shot import build_zero_shot_classifier, check_cache_dir, evaluate_zero_shot, load_text_model

logger = logging.getLogger("paddlemix.eval")

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_zero_shot_eval.py",
        description="Zero-shot evaluation of a CLIP-family model (classification, retrieval, STS).",
    )
    p.add_argument("--model", required=True, help="registered model name, open_clip config JSON, or model directory")
    p.add_argument("--pretrained", default=None, help="weights file or directory (open_clip, EVA-CLIP, HF or paddlemix layout)")
    p.add_argument("--classification_eval", nargs="+", default=[], metavar="DIR",
                   help="ImageFolder dir (images/<class>/..., labels.txt, templates.txt), extracted CIFAR-10/100, "
                        "or 'demo' for the built-in demo data's held-out set")
    p.add_argument("--data_root", default=None,
                   help="with --classification_eval demo: where the demo data is (generated if absent; "
                        "default: the same cache folder training uses)")
    p.add_argument("--retrieval_eval", nargs="+", default=[], metavar="JSON",
                   help='Karpathy test JSON: [{"image": path, "caption": [...]}, ...]')
    p.add_argument("--retrieval_image_root", default=None, metavar="DIR",
                   help="folder the retrieval JSON's image paths are relative to (default: the JSON's folder)")
    p.add_argument("--sts_eval", nargs="+", default=[], metavar="TSV",
                   help="STS files: sentence1<TAB>sentence2<TAB>score, or with a header naming those columns")
    p.add_argument("--per_device_eval_batch_size", type=int, default=32)
    p.add_argument("--dataloader_num_workers", type=int, default=2)
    amp = p.add_mutually_exclusive_group()
    amp.add_argument("--fp16", action="store_true", help="float16 autocast (GPU)")
    amp.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--fp16_opt_level", choices=("O1", "O2"), default="O1",
                   help="O1: fp32 weights under autocast; O2: weights cast to fp16/bf16")
    p.add_argument("--output_dir", default=None,
                   help="where the results go: one CLIP_benchmark-style JSON per evaluation, results.jsonl, "
                        "report.html / retrieval.html with their plots and saved predictions, the classifier cache")
    p.add_argument("--no_report", action="store_true",
                   help="write only the JSON results: no predictions, thumbnails, plots or HTML pages")
    p.add_argument("--classifier_cache_dir", default=None,
                   help="cache zero-shot classifiers here (default: OUTPUT_DIR/classifier_cache)")
    p.add_argument("--no_classifier_cache", action="store_true", help="always rebuild the classifier")
    p.add_argument("--pretrained_text_model", default=None, metavar="MODEL",
                   help="build the zero-shot classifier's class text features with this model's text tower "
                        "(zoo name, config or model directory; loaded once) instead of the evaluated model's")
    p.add_argument("--force_quick_gelu", action="store_true", help="use QuickGELU (OpenAI-trained weights)")
    p.add_argument("--force_image_size", type=int, default=None)
    p.add_argument("--disable_tqdm", action="store_true")
    return p


def _init_distributed() -> int:
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1 and not paddle.distributed.is_initialized():
        paddle.distributed.init_parallel_env()
    return paddle.distributed.get_rank() if paddle.distributed.is_initialized() else 0


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Evaluate everything asked for; returns the result records (identical on every rank)."""
    if not (args.classification_eval or args.retrieval_eval or args.sts_eval):
        raise ValueError("nothing to evaluate: pass --classification_eval, --retrieval_eval and/or --sts_eval")
    rank = _init_distributed()
    amp = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    pure = amp != "fp32" and args.fp16_opt_level == "O2"
    model, _, preprocess = create_model_and_transforms(
        args.model, args.pretrained, precision=amp if pure else "fp32",
        force_quick_gelu=args.force_quick_gelu, force_image_size=args.force_image_size,
    )
    preprocess.output = "numpy"  # decoded in loader workers, which must not create Paddle tensors
    tokenizer = get_tokenizer(model)
    common = dict(batch_size=args.per_device_eval_batch_size, precision="fp32" if pure else amp,
                  progress=not args.disable_tqdm)
    cache_dir: Optional[Path] = None
    if not args.no_classifier_cache:
        if args.classifier_cache_dir:
            cache_dir = Path(args.classifier_cache_dir)
        elif args.output_dir:
            cache_dir = Path(args.output_dir) / "classifier_cache"

    text_model = text_tokenizer = None
    if args.pretrained_text_model and args.classification_eval:
        text_model, text_tokenizer = load_text_model(args.pretrained_text_model, model, amp if pure else "fp32")

    records = []
    save = rank == 0 and bool(args.output_dir) and not args.no_report
    for path in args.classification_eval:
        is_demo = path == "demo"
        if is_demo:
            from ..data.demo import make_demo_dataset

            path = make_demo_dataset(args.data_root).eval_root
        evalset = load_classification_eval(path, preprocess)
        if is_demo:
            evalset.name = "demo"
        if cache_dir is not None:
            check_cache_dir(cache_dir, evalset.root)
        logger.info("zero-shot classification on %s: %d images, %d classes, %d templates",
                    evalset.name, len(evalset.dataset), len(evalset.classnames), len(evalset.templates))
        classifier = None
        if text_model is not None:
            classifier = build_zero_shot_classifier(
                text_model, text_tokenizer, evalset.classnames, evalset.templates,
                batch_size=max(args.per_device_eval_batch_size, 1) * 4, precision=common["precision"],
                cache_dir=cache_dir, progress=common["progress"])
        metrics, predictions = evaluate_zero_shot(
            model, tokenizer, evalset.dataset, evalset.classnames, evalset.templates,
            num_workers=args.dataloader_num_workers, cache_dir=cache_dir, classifier=classifier,
            return_predictions=True, **common)
        records.append(make_record(evalset.name, "zeroshot_classification", metrics, args.model, args.pretrained))
        if save:
            save_classification(args.output_dir, records[-1], predictions, evalset.classnames, evalset.dataset)
    for path in args.retrieval_eval:
        dataset = RetrievalDataset(path, args.retrieval_image_root, preprocess)
        logger.info("zero-shot retrieval on %s: %d images, %d captions", path, len(dataset), len(dataset.texts))
        features = retrieval_features(model, tokenizer, dataset, num_workers=args.dataloader_num_workers, **common)
        metrics = evaluate_retrieval(model, tokenizer, dataset, features=features)
        records.append(make_record(Path(path).stem, "zeroshot_retrieval", metrics, args.model, args.pretrained))
        if save:
            rankings = retrieval_rankings(features["image_features"], features["text_features"], dataset.text_to_image)
            save_retrieval(args.output_dir, records[-1], rankings, dataset)
    if args.sts_eval:
        metrics = evaluate_sts(model, tokenizer, args.sts_eval, **common)
        records.append(make_record("sts", "sts", metrics, args.model, args.pretrained))

    if rank == 0:
        logger.info("results:\n%s", format_table(records))
        if args.output_dir:
            for path in write_evaluation_files(records, args.output_dir):
                logger.info("wrote %s", path)
            if not args.no_report:
                render_reports(args.output_dir, records)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; in a multi-process job this does not return (see :func:`paddlemix._util.run_job_rank`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = int(os.environ.get("PADDLE_TRAINER_ID", "0")) > 0  # only rank 0 reports progress
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.classification_eval or args.retrieval_eval or args.sts_eval):
        parser.error("nothing to evaluate: pass --classification_eval, --retrieval_eval and/or --sts_eval")
    def work() -> int:
        run(args)
        return 0

    return run_job_rank(work, "evaluation")
