"""Contrastive pretraining for CLIP, EVA-CLIP, CLIPA and Mixer models.

    python -m paddle.distributed.launch --nproc_per_node N examples/clip/run_pretrain_dist.py \
        --model EVA02-CLIP-L-14 --task_name coco_karpathy --data_root /data/coco --output_dir out ...
    python examples/clip/run_pretrain_dist.py configs/train/demo.json

Every PaddleNLP TrainingArguments flag works, plus the CLIP flags in paddlemix.train.trainer.
"""
import os
import sys

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # before Paddle loads: MKL's fast path on AMD CPUs

from paddlemix.train.pretrain import parse_args, run  # noqa: E402

if __name__ == "__main__":
    run(*parse_args(sys.argv[1:]))
