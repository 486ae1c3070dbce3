"""Contrastive pretraining for CLIP, EVA-CLIP, CLIPA and Mixer models.

    python -m paddle.distributed.launch --nproc_per_node N examples/clip/run_pretrain_dist.py \
        --model EVA02-CLIP-L-14 --task_name coco_karpathy --data_root /data/coco --output_dir out ...
    python examples/clip/run_pretrain_dist.py configs/train/demo.json
    python examples/clip/run_pretrain_dist.py configs/train/demo.json --task_name data.jsonl --num_train_epochs 30

Every PaddleNLP TrainingArguments flag works, plus the CLIP flags in paddlemix.train.trainer. Flags
after a recipe override its keys.
"""
import runpy
import sys
from pathlib import Path

# paddlemix/_env.py before anything imports Paddle: MKL's AVX2 path on AMD CPUs, all cores, and
# the other CPU settings documented there (README, "Performance").
runpy.run_path(str(Path(__file__).resolve().parents[2] / "paddlemix" / "_env.py"), run_name="paddlemix_apply_cpu_env")

from paddlemix.train.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
