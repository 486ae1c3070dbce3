"""Zero-shot evaluation of a CLIP-family model, with PaddleMIX's flags.

    python examples/clip/run_zero_shot_eval.py --model ViT-B-32 --pretrained weights.safetensors \
        --classification_eval /data/ImageNet-1k/val --per_device_eval_batch_size 64 \
        --dataloader_num_workers 8 --fp16 --output_dir output/eval

Multi-device: ``python -m paddle.distributed.launch --devices 0,1,2,3 examples/clip/run_zero_shot_eval.py ...``.
Run with ``--help`` for every flag; the logic lives in ``paddlemix.eval``.
"""
import sys

from paddlemix.eval.runner import main

if __name__ == "__main__":
    sys.exit(main())
