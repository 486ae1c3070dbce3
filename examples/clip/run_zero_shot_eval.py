"""Zero-shot evaluation of a CLIP-family model, with PaddleMIX's flags.

    python examples/clip/run_zero_shot_eval.py --model ViT-B-32 --pretrained weights.safetensors \
        --classification_eval /data/ImageNet-1k/val --per_device_eval_batch_size 64 \
        --dataloader_num_workers 8 --fp16 --output_dir output/eval

Multi-device: ``python -m paddle.distributed.launch --devices 0,1,2,3 examples/clip/run_zero_shot_eval.py ...``.
Run with ``--help`` for every flag; the logic lives in ``paddlemix.eval``.
"""
import runpy
import sys
from pathlib import Path

# paddlemix/_env.py before anything imports Paddle: MKL's AVX2 path on AMD CPUs, all cores, and
# the other CPU settings documented there (README, "Performance").
runpy.run_path(str(Path(__file__).resolve().parents[2] / "paddlemix" / "_env.py"), run_name="paddlemix_apply_cpu_env")

from paddlemix.eval.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
