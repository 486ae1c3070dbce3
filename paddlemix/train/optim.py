"""Parameter groups, AdamW/LAMB and the warmup-cosine schedule for CLIP training.

Groups carry a learning-rate *multiplier* (Paddle scales the scheduler's current value
by a group's ``learning_rate``), so one scheduler drives every group: a tower with
``visual_lr`` gets ``visual_lr / lr`` and layer decay multiplies on top.

:func:`build_optimizer` does not hand the groups to Paddle as param groups: fleet's
sharding optimizer rejects param groups ("Do not support param_groups now"), and the
Trainer must run with ``--sharding stage1``. The optimizer instead takes a flat
parameter list and looks up each parameter's multiplier and weight decay by name when
it builds that parameter's update. Sharding with tensor fusion renames parameters into
fused buffers, which these optimizers refuse with an error naming the parameter.

Gradient clipping is Paddle's ``ClipGradByGlobalNorm`` inside ``optimizer.step()``: it
runs once per optimizer step (after gradient accumulation), after ``GradScaler``
unscales the gradients, and under fleet's hybrid-parallel wrapper the norm is taken
over all ranks (data-parallel gradients are already averaged, sharded ones are summed
across the sharding group).
"""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import paddle
import paddle.nn as nn
from paddle.optimizer.lr import LRScheduler

logger = logging.getLogger(__name__)

__all__ = [
    "CosineWithWarmup",
    "GroupedAdamW",
    "GroupedLamb",
    "build_optimizer",
    "cosine_with_warmup",
    "layer_id",
    "param_groups",
]

TOWERS = ("visual", "text")

# Name components of parameters that sit before the first block (layer id 0).
EMBEDDING_NAMES = frozenset(
    {
        "patch_embed",
        "conv1",
        "class_embedding",
        "cls_token",
        "positional_embedding",
        "pos_embed",
        "norm_pre",
        "ln_pre",
        "token_embedding",
        "cls_emb",
        "embeddings",
    }
)

# Name components never decayed even when 2-D (position tables) or 0-D by accident of
# shape rules; the model's own ``no_weight_decay()`` adds to this.
NO_DECAY_NAMES = frozenset(
    {"logit_scale", "logit_bias", "class_embedding", "cls_token", "positional_embedding", "pos_embed", "cls_emb"}
)

# ``transformer.blocks.3.``, open_clip ``resblocks.3.``, EVA ``blocks.3.``, HF ``layers.3.``.
_BLOCK_RE = re.compile(r"(?:^|\.)(?:blocks|resblocks|layers|layer)\.(\d+)(?:\.|$)")


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter inside its tower: 0 embeddings, ``i + 1`` block ``i``, ``L + 1`` the rest."""
    if EMBEDDING_NAMES.intersection(name.split(".")):
        return 0
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers + 1


def _tower_depth(names: Iterable[str]) -> int:
    ids = [int(m.group(1)) for m in map(_BLOCK_RE.search, names) if m]
    return max(ids) + 1 if ids else 0


def _no_decay(name: str, param: paddle.Tensor, extra: set) -> bool:
    return (
        param.ndim <= 1
        or name.endswith(".bias")
        or name in extra
        or bool(NO_DECAY_NAMES.intersection(name.split(".")))
    )


def _check_positive(label: str, value: Optional[float], upper: Optional[float] = None) -> None:
    if value is None:
        return
    if not value > 0 or (upper is not None and value > upper):
        bound = f"in (0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{label} must be {bound}, got {value!r}")


def _per_tower(default: float, visual: Optional[float], text: Optional[float]) -> Dict[str, float]:
    """A tower's own setting where given, else ``default``."""
    return {"visual": default if visual is None else visual, "text": default if text is None else text}


def param_groups(
    model: nn.Layer,
    *,
    lr: float,
    weight_decay: float,
    visual_lr: Optional[float] = None,
    text_lr: Optional[float] = None,
    visual_wd: Optional[float] = None,
    text_wd: Optional[float] = None,
    layer_decay: Optional[float] = None,
    visual_ld: Optional[float] = None,
    text_ld: Optional[float] = None,
) -> List[dict]:
    """Trainable parameters grouped by (tower, layer id, decayed or not).

    Each group is a Paddle param-group dict: ``params``, ``learning_rate`` (a multiplier
    of ``lr``, the scheduler's peak), ``weight_decay``; plus ``name`` for logs. Towers
    are the ``visual.`` and ``text.`` sub-layers, each with its own depth ``L`` and decay
    ``d``: a parameter at layer id ``k`` gets ``tower_lr * d ** (L + 1 - k)``. Parameters
    outside both towers (``logit_scale``, ``logit_bias``) use ``lr`` and no decay.

    Biases, every 1-D or 0-D parameter (norm gains, layer scales, temperature),
    position/class embeddings and the names in ``model.no_weight_decay()`` get no
    weight decay. Frozen parameters (``stop_gradient``) are left out.
    """
    _check_positive("lr", lr)
    for label, value in (("layer_decay", layer_decay), ("visual_ld", visual_ld), ("text_ld", text_ld)):
        _check_positive(label, value, upper=1.0)
    non_negative = (
        ("weight_decay", weight_decay), ("visual_wd", visual_wd), ("text_wd", text_wd),
        ("visual_lr", visual_lr), ("text_lr", text_lr),
    )
    for label, value in non_negative:
        if value is not None and value < 0:
            raise ValueError(f"{label} must be >= 0, got {value!r}")

    named = list(model.named_parameters())
    extra = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    tower_lr = _per_tower(lr, visual_lr, text_lr)
    tower_wd = _per_tower(weight_decay, visual_wd, text_wd)
    tower_ld = _per_tower(1.0 if layer_decay is None else layer_decay, visual_ld, text_ld)
    depth = {t: _tower_depth(n[len(t) + 1 :] for n, _ in named if n.startswith(t + ".")) for t in TOWERS}

    groups: "OrderedDict[str, dict]" = OrderedDict()
    for name, param in named:
        if param.stop_gradient:
            continue
        tower = next((t for t in TOWERS if name.startswith(t + ".")), None)
        if tower is None:
            key, mult, wd = "other", 1.0, weight_decay
        else:
            k = layer_id(name[len(tower) + 1 :], depth[tower])
            scale = tower_ld[tower] ** (depth[tower] + 1 - k)
            key, mult, wd = f"{tower}.layer_{k}", tower_lr[tower] * scale / lr, tower_wd[tower]
        if _no_decay(name, param, extra):
            key, wd = key + ".no_decay", 0.0
        group = groups.setdefault(key, {"name": key, "params": [], "learning_rate": mult, "weight_decay": wd})
        group["params"].append(param)
    return list(groups.values())


def _group_maps(groups: Sequence[dict]) -> Tuple[List[paddle.Tensor], Dict[str, float], Dict[str, float]]:
    params, mult, wd = [], {}, {}
    for group in groups:
        for p in group["params"]:
            if p.name in mult:
                raise ValueError(f"parameter {p.name!r} appears in more than one group")
            params.append(p)
            mult[p.name] = float(group["learning_rate"])
            wd[p.name] = float(group["weight_decay"])
    return params, mult, wd


class _PerParamHyper:
    """Looks up a parameter's lr multiplier and weight decay by name at update time.

    ``_decay_arg`` names the Paddle base class's decay argument, passed as 0.0; the base
    class reads it back as the attribute ``_<decay_arg>``, which is set to the decay of
    the parameter being updated just before each parameter's update op.
    """

    _decay_arg: str
    _lr_mult: Dict[str, float]
    _param_wd: Dict[str, float]

    def __init__(self, groups: Sequence[dict], **kwargs):
        params, self._lr_mult, self._param_wd = _group_maps(groups)
        super().__init__(parameters=params, **{self._decay_arg: 0.0}, **kwargs)

    def _hyper(self, param: paddle.Tensor) -> Tuple[float, float]:
        try:
            return self._lr_mult[param.name], self._param_wd[param.name]
        except KeyError:
            raise KeyError(
                f"parameter {param.name!r} is not in this optimizer's groups; build the optimizer "
                "after any wrapping that renames parameters, and disable sharding tensor fusion"
            ) from None

    def _create_param_lr(self, param_and_grad):
        mult, _ = self._hyper(param_and_grad[0])
        lr = self._global_learning_rate()
        return lr if mult == 1.0 else lr * mult

    def _append_optimize_op(self, block, param_and_grad):
        setattr(self, "_" + self._decay_arg, self._hyper(param_and_grad[0])[1])
        return super()._append_optimize_op(block, param_and_grad)

    def effective_lr(self, param: paddle.Tensor) -> float:
        """The learning rate this parameter's next update uses."""
        return self.get_lr() * self._hyper(param)[0]

    def effective_weight_decay(self, param: paddle.Tensor) -> float:
        return self._hyper(param)[1]


class GroupedAdamW(_PerParamHyper, paddle.optimizer.AdamW):
    """AdamW (decoupled decay ``p -= lr * wd * p``) with per-group lr multiplier and decay."""

    _decay_arg = "weight_decay"


class GroupedLamb(_PerParamHyper, paddle.optimizer.Lamb):
    """LAMB with per-group lr multiplier and decay.

    The decay is added to the Adam direction before the trust ratio; tensors without
    decay skip the trust ratio (Paddle's ``always_adapt=False``, as in NVIDIA's LAMB).
    """

    _decay_arg = "lamb_weight_decay"


def build_optimizer(
    model: nn.Layer,
    name: str,
    lr_scheduler: Union[LRScheduler, float],
    *,
    lr: Optional[float] = None,
    weight_decay: float = 0.0,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    visual_lr: Optional[float] = None,
    text_lr: Optional[float] = None,
    visual_wd: Optional[float] = None,
    text_wd: Optional[float] = None,
    layer_decay: Optional[float] = None,
    visual_ld: Optional[float] = None,
    text_ld: Optional[float] = None,
    grad_clip_norm: Optional[float] = None,
    multi_precision: bool = False,
) -> Union[GroupedAdamW, GroupedLamb]:
    """AdamW or LAMB over :func:`param_groups` of ``model``, driven by ``lr_scheduler``.

    ``lr`` is the peak learning rate the tower rates are relative to; it defaults to the
    scheduler's ``base_lr`` (or the float given as ``lr_scheduler``).
    ``grad_clip_norm`` clips the global gradient norm (``None`` or ``<= 0``: no clipping).
    """
    if lr is None:
        lr = lr_scheduler.base_lr if isinstance(lr_scheduler, LRScheduler) else float(lr_scheduler)
    groups = param_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        visual_lr=visual_lr,
        text_lr=text_lr,
        visual_wd=visual_wd,
        text_wd=text_wd,
        layer_decay=layer_decay,
        visual_ld=visual_ld,
        text_ld=text_ld,
    )
    clip = nn.ClipGradByGlobalNorm(grad_clip_norm) if grad_clip_norm and grad_clip_norm > 0 else None
    common = dict(
        learning_rate=lr_scheduler,
        beta1=betas[0],
        beta2=betas[1],
        epsilon=eps,
        grad_clip=clip,
        multi_precision=multi_precision,
    )
    key = name.lower()
    if key == "adamw":
        optimizer = GroupedAdamW(groups, **common)
    elif key == "lamb":
        optimizer = GroupedLamb(groups, **common)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'lamb', got {name!r}")
    for g in groups:
        logger.debug(
            "group %s: %d params, lr x%.4g, wd %g", g["name"], len(g["params"]), g["learning_rate"], g["weight_decay"]
        )
    logger.info("%s over %d parameter groups, %d tensors", key, len(groups), sum(len(g["params"]) for g in groups))
    return optimizer


class CosineWithWarmup(LRScheduler):
    """Linear warmup from 0 to ``peak_lr`` at step ``warmup_steps``, then cosine to ``min_lr``.

    ``lr(s) = peak * s / W`` for ``s < W``; after it
    ``min + (peak - min) * (1 + cos(pi * (s - W) / (T - W))) / 2``, held at ``min_lr``
    from step ``T`` on. Step 0 has lr 0 (Adam still folds that step's gradient into its
    moments), the same convention as PaddleNLP's and HF's warmup schedules.
    """

    def __init__(
        self,
        peak_lr: float,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 0.0,
        last_epoch: int = -1,
        verbose: bool = False,
    ):
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(
                f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, total_steps={total_steps}"
            )
        if not 0 <= min_lr <= peak_lr:
            raise ValueError(f"need 0 <= min_lr <= peak_lr, got min_lr={min_lr}, peak_lr={peak_lr}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_lr = float(min_lr)
        super().__init__(learning_rate=float(peak_lr), last_epoch=last_epoch, verbose=verbose)

    def get_lr(self) -> float:
        step = self.last_epoch
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> CosineWithWarmup:
    return CosineWithWarmup(peak_lr, warmup_steps, total_steps, min_lr)
