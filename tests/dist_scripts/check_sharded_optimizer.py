"""Worker for tests/test_optim.py: the grouped optimizers under fleet sharding stage 1.

Run as ``python -m paddle.distributed.launch --nproc_per_node 2 check_sharded_optimizer.py --out DIR``.
Fleet's sharding optimizer rejects Paddle param groups, which is why
``build_optimizer`` passes a flat parameter list and looks up each parameter's
multiplier and decay by name. Both ranks train the same batches (so the averaged
gradient equals one process's gradient) for a few steps with per-tower learning rates,
layer decay, weight decay and clipping, and write every parameter to
``DIR/<optimizer>.rank<r>.npz``; the test imports this file for the 1-process reference.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Dict

import numpy as np
import paddle

from paddlemix._util import end_job_process
from paddlemix.models import CLIP, CLIPConfig
from paddlemix.train.loss import ClipLoss
from paddlemix.train.optim import build_optimizer, cosine_with_warmup

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "parity" / "openai_quickgelu" / "model_config.json"
STEPS = 3
OPTIMIZERS = ("adamw", "lamb")
# eps 1e-3: the key part of a qkv bias has a gradient that is zero in exact arithmetic,
# and Adam's g / (|g| + eps) would turn its rounding noise into full-size steps.
HYPER = dict(weight_decay=0.1, visual_lr=3e-3, text_lr=5e-4, layer_decay=0.6, text_wd=0.05, eps=1e-3,
             grad_clip_norm=0.5)


def train_steps(name: str, sharded: bool) -> Dict[str, np.ndarray]:
    """Parameters after ``STEPS`` optimizer steps on fixed batches."""
    paddle.seed(0)
    model = CLIP(CLIPConfig.from_model_cfg(json.loads(TINY.read_text())))
    sched = cosine_with_warmup(1e-3, warmup_steps=1, total_steps=10)
    opt = build_optimizer(model, name, sched, **HYPER)
    runner = model
    if sharded:
        from paddle.distributed import fleet

        runner, opt = fleet.distributed_model(model), fleet.distributed_optimizer(opt)
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        images = paddle.to_tensor(rng.normal(size=(4, 3, 32, 32)).astype("float32"))
        text = paddle.to_tensor(rng.integers(1, 500, size=(4, 16)))
        img, txt, scale = runner(images, text)[:3]
        ClipLoss()(img, txt, scale).backward()
        opt.step()
        opt.clear_grad()
        sched.step()
    out = {n: p.numpy() for n, p in model.named_parameters()}
    if sharded:  # record that the step really went through fleet's sharding optimizer
        out["__inner_optimizer__"] = np.array(type(opt._inner_opt).__name__)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import paddle.distributed as dist
    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": 2}
    fleet.init(is_collective=True, strategy=strategy)
    for name in OPTIMIZERS:
        np.savez(Path(args.out) / f"{name}.rank{dist.get_rank()}.npz", **train_steps(name, sharded=True))
        logging.info("rank %d finished %s", dist.get_rank(), name)
    end_job_process(0, barrier=True)  # Paddle's exit teardown can abort a finished rank


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
