"""Worker for tests/test_loss.py: loss gradients on W ranks vs one process on the global batch.

Run as ``python -m paddle.distributed.launch --nproc_per_node 2 check_loss_grads.py --out DIR``.
Each rank takes its rows of a fixed global batch, runs a tiny two-projection model
wrapped in ``paddle.DataParallel`` (which averages parameter gradients over ranks, as
the Trainer does), and writes its loss and the averaged gradients to
``DIR/<case>.rank<r>.npz``. The test imports this file to compute the one-process
reference with the same model and data.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Dict

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddlemix._util import end_job_process
from paddlemix.train.loss import ClipLoss, SigLipLoss

GLOBAL_BATCH = 8
IN_DIM = 12
EMBED_DIM = 6

# name -> (loss kind, local_loss, gather_with_grad, explicit group)
CASES = {
    "clip_local_gwg": ("clip", True, True, True),
    "clip_global_gwg": ("clip", False, True, True),
    "clip_local_gwg_default_group": ("clip", True, True, False),
    "clip_global_nograd": ("clip", False, False, True),
    "siglip": ("siglip", None, None, True),
}


class TwoTower(nn.Layer):
    """Two linear projections and a temperature: enough to carry gradients to parameters."""

    def __init__(self, seed: int, with_bias: bool):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.img_proj = nn.Linear(IN_DIM, EMBED_DIM)
        self.txt_proj = nn.Linear(IN_DIM, EMBED_DIM)
        for layer in (self.img_proj, self.txt_proj):
            layer.weight.set_value(rng.normal(0, 0.5, layer.weight.shape).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
        self.logit_scale = self.create_parameter([], default_initializer=nn.initializer.Constant(np.log(10.0)))
        self.logit_bias = (
            self.create_parameter([], default_initializer=nn.initializer.Constant(-2.0)) if with_bias else None
        )

    def forward(self, images: paddle.Tensor, texts: paddle.Tensor):
        img = F.normalize(self.img_proj(images), axis=-1)
        txt = F.normalize(self.txt_proj(texts), axis=-1)
        bias = None if self.logit_bias is None else self.logit_bias * 1.0
        return img, txt, self.logit_scale.exp(), bias


def global_batch(seed: int):
    rng = np.random.default_rng(seed + 1)
    images = rng.normal(size=(GLOBAL_BATCH, IN_DIM)).astype("float32")
    texts = (images[:, ::-1] + 0.5 * rng.normal(size=(GLOBAL_BATCH, IN_DIM))).astype("float32")
    return images, texts


def run_case(case: str, seed: int, rank: int, world_size: int, group, data_parallel: bool) -> Dict[str, np.ndarray]:
    """Loss and parameter gradients of ``case`` on this rank's rows of the global batch."""
    kind, local_loss, with_grad, _ = CASES[case]
    model = TwoTower(seed, with_bias=kind == "siglip")
    runner = paddle.DataParallel(model, group=group) if data_parallel else model
    if kind == "clip":
        loss_fn = ClipLoss(local_loss, with_grad, rank=rank, world_size=world_size, group=group)
    else:
        loss_fn = SigLipLoss(rank=rank, world_size=world_size, group=group)
    images, texts = global_batch(seed)
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    img, txt, scale, bias = runner(paddle.to_tensor(images[rows]), paddle.to_tensor(texts[rows]))
    loss = loss_fn(img, txt, scale) if kind == "clip" else loss_fn(img, txt, scale, bias)
    loss.backward()
    out = {"loss": loss.numpy()}
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import paddle.distributed as dist

    dist.init_parallel_env()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    explicit = dist.new_group(list(range(world_size)))
    for case, (_, _, _, use_explicit) in CASES.items():
        group = explicit if use_explicit else None
        result = run_case(case, args.seed, rank, world_size, group, data_parallel=True)
        np.savez(Path(args.out) / f"{case}.rank{rank}.npz", **result)
        logging.info("rank %d finished %s", rank, case)
    end_job_process(0, barrier=True)  # Paddle's exit teardown can abort a finished rank


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
