"""Worker for tests/test_tensor_parallel.py: a tensor-parallel CLIP against degree 1.

Run as ``python -m paddle.distributed.launch --nproc_per_node 2 tp_check.py --out DIR``.
For each tiny parity model (CLIP, EVA02) every rank builds the degree-1 model and a
copy converted with ``tensor_parallelize`` over an explicit group, then records in
``DIR/<case>.rank<r>.npz``:

- ``{ref,tp}.eval.{image,text}``: eval-mode features;
- ``{ref,tp}.train.{image,text,loss}`` and ``{ref,tp}.grad.<param>``: a train-mode step
  with drop path and patch dropout on (same seed on every rank), the contrastive loss and
  the gradients of every parameter (degree 2 merged over the group; EVA02's degree-2
  model recomputes its blocks in backward);
- ``{ref,tp}.step.eval.*``: features after one SGD step on each model;
- ``merged.eval.*``: the degree-2 weights merged, saved with ``save_pretrained`` by rank 0
  and loaded by ``CLIP.from_pretrained`` at degree 1;
- ``resplit.eval.*`` / ``resplit.param_gap``: that checkpoint split to degree 2 again,
  against the stepped degree-2 model.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Dict

import numpy as np
import paddle
import paddle.distributed as dist

import paddlemix
from paddlemix._util import end_job_process
from paddlemix.models.clip_model import CLIP
from paddlemix.train.loss import ClipLoss
from paddlemix.train.tensor_parallel import gather_full_state_dict, tensor_parallelize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
CASES = {"clip": "openai_quickgelu", "eva02": "eva02_rope_swiglu"}
# The degree-2 EVA02 model recomputes its blocks in backward, as ``--recompute`` runs it.
RECOMPUTE = {"clip": False, "eva02": True}
BATCH = 4
DROP_PATH = 0.2
PATCH_DROPOUT = 0.25
TRAIN_SEED = 1234
LR = 0.05


def model_config(case: str, folder: Path, tag: str) -> Path:
    """The fixture config with drop path and patch dropout switched on, written to ``folder``."""
    cfg = json.loads((FIXTURES / CASES[case] / "model_config.json").read_text())
    cfg["vision_cfg"]["drop_path_rate"] = DROP_PATH
    cfg["vision_cfg"]["patch_dropout"] = PATCH_DROPOUT
    path = folder / f"{case}.{tag}.json"
    path.write_text(json.dumps(cfg))
    return path


def build(cfg_path: Path, case: str) -> CLIP:
    return paddlemix.create_model(cfg_path, pretrained=FIXTURES / CASES[case] / "model.safetensors")


def inputs(model: CLIP, seed: int = 0):
    """Images and token rows ending in the largest id (the pooled EOT), zero-padded."""
    rng = np.random.default_rng(seed)
    size = model.image_size
    images = rng.normal(size=(BATCH, 3, size[0], size[1])).astype("float32")
    vocab, length = model.text.vocab_size, model.context_length
    texts = np.zeros((BATCH, length), dtype="int64")
    for row in range(BATCH):
        n = int(rng.integers(3, length))
        texts[row, : n - 1] = rng.integers(1, vocab - 1, size=n - 1)
        texts[row, n - 1] = vocab - 1
    return paddle.to_tensor(images), paddle.to_tensor(texts)


def features(model: CLIP, images, texts, prefix: str) -> Dict[str, np.ndarray]:
    model.eval()
    with paddle.no_grad():
        image, text = model.encode_image(images), model.encode_text(texts)
    return {f"{prefix}.image": image.numpy(), f"{prefix}.text": text.numpy()}


def train_step(model: CLIP, images, texts, prefix: str) -> Dict[str, np.ndarray]:
    """Train-mode forward with a fixed seed, contrastive loss and backward."""
    model.train()
    paddle.seed(TRAIN_SEED)
    image_features, text_features, scale = model(images, texts)
    loss = ClipLoss()(image_features, text_features, scale)
    loss.backward()
    return {
        f"{prefix}.image": image_features.numpy(),
        f"{prefix}.text": text_features.numpy(),
        f"{prefix}.loss": loss.numpy(),
    }


def sgd(model: CLIP) -> None:
    with paddle.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param.set_value(param - LR * param.grad)
    model.clear_gradients()


def run_case(case: str, out: Path, group, rank: int, world_size: int) -> Dict[str, np.ndarray]:
    cfg_path = model_config(case, out, f"rank{rank}")
    ref = build(cfg_path, case)
    tp = tensor_parallelize(build(cfg_path, case), group, rank, world_size)
    tp.set_grad_checkpointing(RECOMPUTE[case])
    images, texts = inputs(ref)
    local_qkv = tp.visual.transformer.blocks[0].attn.qkv.weight
    result: Dict[str, np.ndarray] = {"tp.local_qkv_shape": np.array(local_qkv.shape)}
    for name, model in (("ref", ref), ("tp", tp)):
        result.update(features(model, images, texts, f"{name}.eval"))
        result.update(train_step(model, images, texts, f"{name}.train"))
    for name, param in ref.named_parameters():
        result[f"ref.grad.{name}"] = param.grad.numpy()
    grads = {name: param.grad for name, param in tp.named_parameters()}
    for name, grad in gather_full_state_dict(grads, tp.config, group, world_size, replica_atol=0.0).items():
        result[f"tp.grad.{name}"] = grad
    sgd(ref)
    sgd(tp)
    result.update(features(ref, images, texts, "ref.step.eval"))
    result.update(features(tp, images, texts, "tp.step.eval"))

    # Save at degree 2 (merged), load at degree 1, split to degree 2 again.
    merged = gather_full_state_dict(tp.state_dict(), tp.config, group, world_size, replica_atol=0.0)
    ckpt = out / f"{case}_ckpt"
    if rank == 0:
        saver = paddlemix.create_model(cfg_path)
        saver.set_state_dict(merged)
        saver.save_pretrained(str(ckpt))
    dist.barrier(group)
    loaded = CLIP.from_pretrained(str(ckpt))
    result.update(features(loaded, images, texts, "merged.eval"))
    resplit = tensor_parallelize(CLIP.from_pretrained(str(ckpt)), group, rank, world_size)
    result.update(features(resplit, images, texts, "resplit.eval"))
    local = tp.state_dict()
    result["resplit.param_gap"] = np.array(
        max(float(np.max(np.abs(t.numpy() - local[k].numpy()))) for k, t in resplit.state_dict().items())
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    dist.init_parallel_env()
    world_size = dist.get_world_size()
    group = dist.new_group(list(range(world_size)))
    rank = group.rank
    for case in CASES:
        np.savez(out / f"{case}.rank{rank}.npz", **run_case(case, out, group, rank, world_size))
        logging.info("rank %d finished %s", rank, case)
    end_job_process(0, barrier=True)  # Paddle's exit teardown can abort a finished rank


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
