"""Contrastive pretraining on PaddleNLP's Trainer, for every model family.

The Trainer brings data-parallel and sharded training, mixed precision, gradient
accumulation, checkpointing and resumption; this module adds what is specific to
CLIP: the contrastive loss over the whole data world, per-tower parameter groups,
the logit-scale clamp, LiT locking, and zero-shot evaluation during training.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.io import DistributedBatchSampler
from paddlenlp.trainer import TrainerCallback, TrainingArguments

from .loader import TrainDataLoader
from .loss import ClipLoss, SigLipLoss
from .optim import build_optimizer, cosine_with_warmup
from .paddlenlp_adapter import PaddleNLPTrainerAdapter
from .reporting import TRAIN_LOG_NAME, install_reporting, training_scalars
from .settings import check_data_args, check_training_args

logger = logging.getLogger(__name__)

__all__ = ["ModelArguments", "DataArguments", "PreTrainingArguments", "CLIPTrainer", "collate_batch"]


@dataclass
class ModelArguments:
    model: str = field(default="CLIP-tiny-demo", metadata={"help": "registered name, config JSON, or model dir"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "weights file or directory to start from"})
    force_image_size: Optional[int] = field(default=None, metadata={"help": "train at this image size"})
    force_patch_dropout: Optional[float] = field(default=None, metadata={"help": "fraction of patches dropped"})
    force_quick_gelu: bool = field(default=False, metadata={"help": "use QuickGELU (OpenAI-trained weights)"})
    context_length: Optional[int] = field(default=None, metadata={"help": "text context length override"})
    lock_image: bool = field(default=False, metadata={"help": "freeze the image tower (LiT)"})
    lock_image_unlocked_groups: int = field(default=0, metadata={"help": "last image groups left trainable"})
    lock_text: bool = field(default=False, metadata={"help": "freeze the text tower"})
    lock_text_unlocked_layers: int = field(default=0, metadata={"help": "last text blocks left trainable"})
    pretrained_text_model: Optional[str] = field(
        default=None,
        metadata={"help": "model whose text tower builds the zero-shot classifier (loaded once; its features "
                          "are fixed); default: the text tower being trained"},
    )


@dataclass
class DataArguments:
    task_name: str = field(
        default="demo",
        metadata={"help": "demo | coco_karpathy | a COCO .json | .jsonl/.csv | LAION filelist | tar shard pattern"},
    )
    data_root: Optional[str] = field(
        default=None,
        metadata={"help": "dataset folder (coco_karpathy: default $PADDLEMIX_HOME/datasets/coco, downloaded once; demo)"},
    )
    image_root: Optional[str] = field(default=None, metadata={"help": "folder of relative image paths"})
    image_key: Optional[str] = field(default=None, metadata={"help": "JSONL/CSV image column"})
    caption_key: Optional[str] = field(default=None, metadata={"help": "JSONL/CSV/webdataset caption field"})
    csv_separator: Optional[str] = field(default=None, metadata={"help": "CSV delimiter"})
    classification_eval: Optional[str] = field(
        default=None, metadata={"help": "zero-shot eval set: ImageFolder dir, CIFAR dir, or 'demo'"}
    )
    text_reduction: Optional[str] = field(
        default=None,
        metadata={"help": "CLIPA text token reduction to --context_length tokens: truncate|random|block|syntax"},
    )
    max_skip_fraction: float = field(default=0.1, metadata={"help": "stop when more samples than this are bad"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "streaming shuffle buffer per reader"})

    def __post_init__(self):
        check_data_args(self)


@dataclass
class PreTrainingArguments(TrainingArguments):
    """PaddleNLP's TrainingArguments plus PaddleMIX's CLIP flags."""

    loss: str = field(default="clip", metadata={"help": "clip (InfoNCE) or siglip (sigmoid)"})
    local_loss: bool = field(default=False, metadata={"help": "score local rows against global columns"})
    gather_with_grad: bool = field(default=False, metadata={"help": "all-gather features with gradient"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw or lamb"})
    visual_lr: Optional[float] = field(default=None, metadata={"help": "image tower peak learning rate"})
    text_lr: Optional[float] = field(default=None, metadata={"help": "text tower peak learning rate"})
    visual_wd: Optional[float] = field(default=None, metadata={"help": "image tower weight decay"})
    text_wd: Optional[float] = field(default=None, metadata={"help": "text tower weight decay"})
    layer_decay: Optional[float] = field(default=None, metadata={"help": "layer-wise lr decay for both towers"})
    visual_ld: Optional[float] = field(default=None, metadata={"help": "image tower layer decay"})
    text_ld: Optional[float] = field(default=None, metadata={"help": "text tower layer decay"})
    min_lr: float = field(default=0.0, metadata={"help": "cosine schedule floor"})
    logit_scale_max: float = field(default=math.log(100.0), metadata={"help": "clamp of log logit scale"})

    def __post_init__(self):
        check_training_args(self)
        super().__post_init__()
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"--loss must be 'clip' or 'siglip', got {self.loss!r}")
        if self.optimizer not in ("adamw", "lamb"):
            raise ValueError(f"--optimizer must be 'adamw' or 'lamb', got {self.optimizer!r}")
        if self.local_loss and not self.gather_with_grad:
            logger.warning("--local_loss without --gather_with_grad gives gradients of only the local rows")


def collate_batch(samples: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Stack the per-sample arrays; skipped samples never reach here (the datasets drop them).

    Arrays, not tensors: this runs in loader workers, and the loader makes the tensors in the
    training process (see :mod:`paddlemix.train.loader` for why a worker must not).
    """
    return {
        "image": np.stack([s["image"] for s in samples]),
        "input_ids": np.stack([s["input_ids"] for s in samples]).astype("int64"),
    }


def data_world(args: TrainingArguments):
    """(rank, size, group) of the ranks that see different data: data-parallel x sharding.

    With tensor (or pipeline) parallelism the ranks of one model replica see the same
    batch, so the contrastive gather runs over the replica-crossing group only.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return 0, 1, None
    if args.tensor_parallel_degree <= 1 and args.pipeline_parallel_degree <= 1:
        return dist.get_rank(), world, None
    from paddle.distributed import fleet

    hcg = fleet.get_hybrid_communicate_group()
    if args.sharding_parallel_degree > 1 and hcg.get_data_parallel_world_size() > 1:
        raise NotImplementedError(
            "contrastive gather over data-parallel x sharding with tensor parallelism is not wired; "
            "use --sharding_parallel_degree or data parallelism with tensor parallelism, not both"
        )
    if args.sharding_parallel_degree > 1:
        rank, size, group = (hcg.get_sharding_parallel_rank(), hcg.get_sharding_parallel_world_size(),
                             hcg.get_sharding_parallel_group())
    else:
        rank, size, group = (hcg.get_data_parallel_rank(), hcg.get_data_parallel_world_size(),
                             hcg.get_data_parallel_group())
    # One replica (all ranks tensor or pipeline parallel): nothing to gather. The topology's
    # group object of a single rank does not count this process as a member (rank -1).
    return (0, 1, None) if size == 1 else (rank, size, group)


class _ClampLogitScale(TrainerCallback):
    """open_clip clamps the temperature after every optimizer step so logits stay bounded."""

    def __init__(self, trainer: "CLIPTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        scale = self.trainer.clip_model.logit_scale
        with paddle.no_grad():
            scale.set_value(paddle.clip(scale, 0.0, args.logit_scale_max))


class _SetEpoch(TrainerCallback):
    """Reshuffle the training data each epoch (the Trainer only does it for its own samplers)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(self.epoch)
        self.epoch += 1


class _TrainLogFromStart(TrainerCallback):
    """``train_log.jsonl`` holds each step once: entries past the step a run starts from are dropped.

    A run resumed from ``checkpoint-N`` logs steps ``N+1...`` again, and a new run in the same
    output folder starts at step 0; what the earlier process logged after that point is not part
    of this run's history.
    """

    def __init__(self, trainer: "CLIPTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        path = self.trainer.train_log_path
        if not self.trainer.is_world_process_zero() or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= state.global_step]
        if len(kept) != len(lines):
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, path)


class CLIPTrainer(PaddleNLPTrainerAdapter):
    """Trainer whose loss is contrastive over the data world and whose eval is zero-shot.

    It overrides only public Trainer methods and the hooks of :class:`PaddleNLPTrainerAdapter`,
    which holds every use of PaddleNLP's private members.

    ``eval_fn(model) -> Dict[str, float]`` runs the zero-shot evaluation; it is called by
    ``evaluate()``, i.e. every ``eval_steps`` with ``--evaluation_strategy steps``, with the
    classifier rebuilt from the current text tower each time (or fixed, from
    ``--pretrained_text_model``).
    """

    def __init__(self, *args, eval_fn=None, skip_counters=(), **kwargs):
        super().__init__(*args, **kwargs)
        rank, size, group = data_world(self.args)
        if self.args.loss == "siglip":
            self.loss_fn = SigLipLoss(rank=rank, world_size=size, group=group)
        else:
            self.loss_fn = ClipLoss(
                local_loss=self.args.local_loss,
                gather_with_grad=self.args.gather_with_grad,
                rank=rank,
                world_size=size,
                group=group,
            )
        self.eval_fn = eval_fn
        self.skip_counters = list(skip_counters)
        self._tic = time.perf_counter()
        self._samples = 0
        self.add_callback(_ClampLogitScale(self))
        self.add_callback(_TrainLogFromStart(self))
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_SetEpoch(self.train_dataset))
        install_reporting(self)

    def train_batch_sampler(self) -> DistributedBatchSampler:
        """The distributed sampler at every world size, data rank and tensor-parallel degree.

        Its order depends only on the epoch and the data-world rank, so one process and a
        tensor-parallel group see the same batches (PaddleNLP gives one process a different,
        globally seeded sampler).
        """
        return DistributedBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            num_replicas=self.args.dataset_world_size,
            rank=self.args.dataset_rank,
            drop_last=self.args.dataloader_drop_last,
        )

    def get_train_dataloader(self):
        """A loader whose data errors end the run (see :mod:`paddlemix.train.loader`).

        Streaming sources split themselves over ranks and workers, so they are not sharded again.
        """
        dataset = self.train_dataset
        common = dict(collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers)
        if isinstance(dataset, paddle.io.IterableDataset):
            return TrainDataLoader(dataset, batch_size=self.args.per_device_train_batch_size, drop_last=True, **common)
        return TrainDataLoader(dataset, batch_sampler=self.train_batch_sampler(), **common)

    def wrap_model_for_training(self, model, training: bool):
        """Tensor parallelism with the project's own layers (:mod:`paddlemix.train.tensor_parallel`).

        fleet's ``TensorParallel`` wrapper broadcasts every batch with a GPU-only op, and the
        split layers already run their collectives on explicit groups; so the model stays
        unwrapped. What the wrapper also did is done here: every data-world replica starts
        from the same weights (a broadcast over the data world; within a tensor-parallel group
        the seeds are equal and the split shards differ by design), and the optimizer is fleet's
        hybrid one, which averages gradients over the data-parallel ranks, shards stage1 state,
        and clips by a global norm that counts each split parameter once.
        """
        if self.args.tensor_parallel_degree <= 1 or self.args.pipeline_parallel_degree > 1:
            return None  # PaddleNLP's wrapping
        if not training or getattr(self, "_tensor_parallel_ready", False):
            return model
        from paddle.distributed import fleet

        _, size, group = data_world(self.args)
        if size > 1:
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor, src=group.ranks[0], group=group)
        self.optimizer = fleet.distributed_optimizer(self.optimizer)
        self._tensor_parallel_ready = True
        return model

    @property
    def train_log_path(self) -> str:
        return os.path.join(self.args.output_dir, TRAIN_LOG_NAME)

    @property
    def clip_model(self):
        model = self.model
        return model._layers if hasattr(model, "_layers") else model

    def save_model(self, output_dir: Optional[str] = None, merge_tensor_parallel: Optional[bool] = False):
        """Tensor-parallel runs save one merged checkpoint, loadable at any degree.

        Every model-parallel rank of the first data replica joins the gather; one of them writes.
        """
        if self.args.tensor_parallel_degree <= 1:
            return super().save_model(output_dir, merge_tensor_parallel=merge_tensor_parallel)
        if not self.args.should_save_model_state:
            return None
        from paddle.distributed import fleet

        from ..zoo.checkpoint import save_safetensors
        from .tensor_parallel import gather_full_state_dict

        hcg = fleet.get_hybrid_communicate_group()
        model = self.clip_model
        full = gather_full_state_dict(model.state_dict(), model.config, hcg.get_model_parallel_group(),
                                      hcg.get_model_parallel_world_size())
        if hcg.get_model_parallel_rank() == 0 and self.args.dataset_rank == 0:
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            model.config.save_pretrained(output_dir)
            save_safetensors({k: np.asarray(v) for k, v in full.items()}, os.path.join(output_dir, "model.safetensors"))
        return None

    def load_model_weights(self, checkpoint: str) -> bool:
        """Resume model weights from the safetensors checkpoints ``CLIP.save_pretrained`` writes."""
        if not os.path.isfile(os.path.join(checkpoint, "model.safetensors")):
            return False
        from ..zoo.loading import load_checkpoint

        load_checkpoint(self.clip_model, checkpoint)
        logger.info("resumed model weights from %s", checkpoint)
        return True

    def compute_loss(self, model, inputs, return_outputs=False):
        out = model(image=inputs["image"], text=inputs["input_ids"])
        image_features, text_features, scale = out[:3]
        if self.args.loss == "siglip":
            if len(out) < 4:
                raise ValueError("the SigLIP loss needs a model with logit_bias: set init_logit_bias in its config")
            loss = self.loss_fn(image_features, text_features, scale, out[3])
        else:
            loss = self.loss_fn(image_features, text_features, scale)
        self._samples += inputs["image"].shape[0]
        return (loss, out) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int):
        if self.lr_scheduler is None:
            warmup = self.args.warmup_steps or int(self.args.warmup_ratio * num_training_steps)
            self.lr_scheduler = cosine_with_warmup(
                self.args.learning_rate, warmup, num_training_steps, min_lr=self.args.min_lr
            )
        return self.lr_scheduler

    def create_optimizer(self, lr_scheduler=None):
        if self.optimizer is None:
            a = self.args
            self.optimizer = build_optimizer(
                self.clip_model,
                a.optimizer,
                lr_scheduler if lr_scheduler is not None else self.lr_scheduler,
                lr=a.learning_rate,
                weight_decay=a.weight_decay,
                betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_epsilon,
                visual_lr=a.visual_lr,
                text_lr=a.text_lr,
                visual_wd=a.visual_wd,
                text_wd=a.text_wd,
                layer_decay=a.layer_decay,
                visual_ld=a.visual_ld,
                text_ld=a.text_ld,
                grad_clip_norm=a.max_grad_norm,
                multi_precision=a.fp16_opt_level == "O2",
            )
        return self.optimizer

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "loss" in logs:
            now = time.perf_counter()
            world = self.loss_fn.world_size  # data ranks: a tensor-parallel group shares its batch
            logs["samples_per_second"] = round(self._samples * world / max(now - self._tic, 1e-9), 2)
            self._tic, self._samples = now, 0
            logs.update(training_scalars(self.clip_model, self.skip_counters))
        if self.is_world_process_zero():
            # PaddleNLP keeps no log history; a JSON-lines file makes runs comparable afterwards.
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(self.train_log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.state.global_step, **logs}, default=float) + "\n")
        super().log(logs, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        if self.eval_fn is None:
            return {}
        model = self.clip_model
        was_training = model.training
        model.eval()
        try:
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.eval_fn(model).items()}
        finally:
            if was_training:
                model.train()
        self.log(metrics)
        return metrics
