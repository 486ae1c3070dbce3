"""Zero-shot evaluation: classification (ImageNet / ImageFolder / CIFAR), retrieval (COCO, Flickr30k), STS.

Typical use inside a training loop (every rank calls it when distributed)::

    from paddlemix.eval import build_zero_shot_classifier, evaluate_zero_shot, load_classification_eval
    evalset = load_classification_eval("data/eval", preprocess_numpy)
    metrics = evaluate_zero_shot(model, tokenizer, evalset.dataset, evalset.classnames, evalset.templates)
    metrics["acc1"], metrics["acc5"], metrics["mean_per_class_recall"]
"""
from .datasets import (
    CifarDataset,
    ClassificationEvalSet,
    ImageFolderDataset,
    ImageListDataset,
    RetrievalDataset,
    StsPairs,
    load_classification_eval,
    read_sts_tsv,
)
from .imagenet_metadata import CIFAR_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from .metrics import (
    classification_metrics,
    mean_per_class_recall,
    recall_at_k,
    retrieval_metrics,
    spearman,
    top_k_accuracy,
    topk_correct,
)
from .pages import render_reports, save_classification, save_retrieval
from .report import format_table, make_record, read_records, write_evaluation_files, write_results
from .retrieval import evaluate_retrieval, retrieval_features, retrieval_rankings
from .sts import evaluate_sts
from .zero_shot import build_zero_shot_classifier, classifier_cache_key, evaluate_zero_shot, zero_shot_predictions

__all__ = [
    "CIFAR_TEMPLATES",
    "IMAGENET_CLASSNAMES",
    "OPENAI_IMAGENET_TEMPLATES",
    "CifarDataset",
    "ClassificationEvalSet",
    "ImageFolderDataset",
    "ImageListDataset",
    "RetrievalDataset",
    "StsPairs",
    "build_zero_shot_classifier",
    "classification_metrics",
    "classifier_cache_key",
    "evaluate_retrieval",
    "evaluate_sts",
    "evaluate_zero_shot",
    "format_table",
    "load_classification_eval",
    "make_record",
    "mean_per_class_recall",
    "read_records",
    "read_sts_tsv",
    "recall_at_k",
    "render_reports",
    "retrieval_features",
    "retrieval_metrics",
    "retrieval_rankings",
    "save_classification",
    "save_retrieval",
    "spearman",
    "top_k_accuracy",
    "topk_correct",
    "write_evaluation_files",
    "write_results",
    "zero_shot_predictions",
]
