"""Training-data sources (COCO Karpathy, JSONL/CSV, PaddleMIX LAION, webdataset, demo) and their factory.

Every source yields ``{"image": float32 CHW, "input_ids": int64 [L]}`` samples, skips bad samples with
counted reasons (``dataset.skips``), and reshuffles per ``set_epoch``. See ``build_train_dataset``.
"""
from paddlemix.data.sources.common import (
    DEFAULT_MAX_PIXELS,
    SKIP_REASONS,
    SampleError,
    SkipCounter,
    SkippedTooManyError,
    decode_image,
    expand_braces,
    expand_shard_pattern,
)
from paddlemix.data.sources.factory import TASK_NAME_HELP, build_train_dataset, resolve_coco_karpathy
from paddlemix.data.sources.mapstyle import CaptionFileDataset, CaptionListDataset, CocoKarpathyDataset
from paddlemix.data.sources.streaming import (
    LaionFilelistDataset,
    StreamingCaptionDataset,
    WebDatasetTarDataset,
    assign_parts,
    read_filelist,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SKIP_REASONS",
    "TASK_NAME_HELP",
    "CaptionFileDataset",
    "CaptionListDataset",
    "CocoKarpathyDataset",
    "LaionFilelistDataset",
    "SampleError",
    "SkipCounter",
    "SkippedTooManyError",
    "StreamingCaptionDataset",
    "WebDatasetTarDataset",
    "assign_parts",
    "build_train_dataset",
    "decode_image",
    "expand_braces",
    "expand_shard_pattern",
    "read_filelist",
    "resolve_coco_karpathy",
]
