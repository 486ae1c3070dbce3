"""Megatron-style tensor parallelism for the CLIP towers, on an explicit process group.

Why these layers exist: fleet's ``TensorParallel`` wrapper asserts a GPU and its
``ColumnParallelLinear`` runs the ``c_identity`` op, which has no CPU kernel, so a model
built on them cannot be checked on a CPU machine. The layers here use only
``paddle.distributed.all_reduce`` / ``all_gather`` (gloo on CPU, NCCL on GPU) inside
``PyLayer`` autograd functions, so one implementation serves both devices and the
tensor-parallel model itself is verified on CPU.

How a tower is split over a group of N ranks (this rank holds part r of each):

- ``attn.qkv`` column-parallel with the heads split: q, k and v are split separately,
  so rank r holds heads ``[r H/N, (r+1) H/N)`` of each and the local ``[q | k | v]``
  layout is the one :class:`~paddlemix.models.layers.Attention` reshapes; EVA's
  ``q_bias`` / ``v_bias`` follow the heads. ``attn.proj`` row-parallel (one all-reduce).
- ``mlp.fc1`` column-parallel; for SwiGLU its gate and value halves are split
  separately, so the local ``fc1`` is again ``[gate | value]``. ``mlp.fc2`` row-parallel.
- EVA's sub-LN norms (``attn.norm``, ``mlp.norm``) normalise over the full width although
  each rank holds a slice: :class:`ParallelLayerNorm` all-reduces the sums, so the
  statistics (and the numbers) are those of the unsplit norm.
- ``text.token_embedding`` vocab-parallel: each rank looks up the ids in its rows,
  zeroes the rest, and an all-reduce assembles the embeddings.
- Everything else (patch embedding, norms between blocks, heads, biases of row-parallel
  layers) is replicated; its gradients come out identical on every rank.

Every collective takes the group as an argument; nothing reads global state or the
environment, because with data parallel x tensor parallel the tensor-parallel group is
not Paddle's global group.

Randomness: every stochastic op in the towers (patch dropout, drop path, the dropout after
``attn.proj``) acts on replicated activations, so each rank of a tensor-parallel group
must draw the same numbers. Seed Paddle's default generator identically on the ranks of
a group (and differently across data-parallel ranks): PaddleNLP's ``set_seed`` does this,
its ``global_seed`` being equal within the model-parallel group. The layers here draw no
random numbers and the local shapes are equal on every rank, so the generators stay in
step, and with the same seed degree N draws exactly the masks of degree 1.
:func:`tensor_parallelize` refuses dropout inside the split width (attention-probability
or MLP-hidden dropout), where equal seeds would repeat one mask on every slice; no
config builds them today.

Checkpoints are always saved and loaded at degree 1: :func:`gather_full_state_dict`
all-gathers the shards and merges them (save on one rank); to load, build and load the
degree-1 model as usual, then call :func:`tensor_parallelize`, which splits the loaded
weights. :func:`split_state_dict` / :func:`merge_state_dicts` are the same rules on plain
dicts, so a checkpoint trained at one degree loads at any other.

With PaddleNLP's Trainer, ``--tensor_parallel_degree N`` makes ``TrainingArguments``
initialise fleet's hybrid topology (on CPU processes through gloo as on GPUs). The model is
then converted once, after loading and before the Trainer builds an optimizer (the split
layers hold new parameter objects), and ``CLIPTrainer`` leaves it unwrapped (fleet's
``TensorParallel`` wrapper broadcasts every batch with a GPU-only op)::

    hcg = fleet.get_hybrid_communicate_group()
    tensor_parallelize(model, hcg.get_model_parallel_group(),
                       hcg.get_model_parallel_rank(), hcg.get_model_parallel_world_size())

Split parameters carry ``is_distributed = True``, which is what fleet's hybrid
global-norm clipping reads to sum their squared norms over the model-parallel group.
The ranks of one tensor-parallel group must see the same batch, and the contrastive
loss's data world is the data-parallel x sharding ranks, not the model-parallel ones.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from ..models.config import CLIPConfig
from ..models.layers import Attention, Mlp, RMSNorm, SwiGLU
from ..models.transformer import TextTransformer, VisionTransformer

logger = logging.getLogger(__name__)

__all__ = [
    "copy_to_group",
    "reduce_from_group",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ParallelLayerNorm",
    "ParallelRMSNorm",
    "ShardRule",
    "shard_rule",
    "split_state_dict",
    "merge_state_dicts",
    "gather_full_state_dict",
    "tensor_parallelize",
]


# --------------------------------------------------------------------------- collectives


class _CopyToGroup(PyLayer):
    """Identity forward, all-reduce backward: the entry of a column-parallel region.

    Each rank's branch contributes part of the input's gradient; the sum is the full one.
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, group) -> paddle.Tensor:
        ctx.group = group
        # A view, not ``x`` itself: a PyLayer may not return its input (Paddle treats it as inplace).
        return x.view(x.shape)

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> paddle.Tensor:
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total


class _ReduceFromGroup(PyLayer):
    """All-reduce forward, identity backward: the exit of a row-parallel region.

    The output is replicated and so is its gradient, which is each partial sum's gradient.
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, group) -> paddle.Tensor:
        total = x.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> paddle.Tensor:
        return grad


def copy_to_group(x: paddle.Tensor, group) -> paddle.Tensor:
    """``x`` unchanged; in backward, the gradient summed over the ranks of ``group``."""
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: paddle.Tensor, group) -> paddle.Tensor:
    """The sum of ``x`` over the ranks of ``group``; in backward, the gradient unchanged."""
    return _ReduceFromGroup.apply(x, group)


def _sum_over_group(x: paddle.Tensor, group) -> paddle.Tensor:
    """A replicated sum of per-rank partials that is consumed by split computation again.

    Its gradient arrives in per-rank parts, so both directions all-reduce.
    """
    return copy_to_group(reduce_from_group(x, group), group)


# --------------------------------------------------------------------------- layers


def _zeros() -> nn.initializer.Initializer:
    # Placeholders: tensor_parallelize fills every parameter from the split state dict.
    return nn.initializer.Constant(0.0)


def _split_param(layer: nn.Layer, shape: List[int], dtype, is_bias: bool = False) -> paddle.Tensor:
    param = layer.create_parameter(shape, dtype=dtype, default_initializer=_zeros(), is_bias=is_bias)
    param.is_distributed = True
    return param


class ColumnParallelLinear(nn.Layer):
    """``x @ W[:, cols] + b[cols]`` for this rank's output columns; ``x`` is replicated."""

    def __init__(self, in_features: int, local_out_features: int, has_bias: bool, group, dtype="float32"):
        super().__init__()
        self.group = group
        self.weight = _split_param(self, [in_features, local_out_features], dtype)
        self.bias = _split_param(self, [local_out_features], dtype, is_bias=True) if has_bias else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Layer):
    """``sum_r x_r @ W[rows_r, :] + b``: the input is split by columns, the output replicated.

    The bias is replicated and added once, after the all-reduce.
    """

    def __init__(self, local_in_features: int, out_features: int, has_bias: bool, group, dtype="float32"):
        super().__init__()
        self.group = group
        self.weight = _split_param(self, [local_in_features, out_features], dtype)
        self.bias = (
            self.create_parameter([out_features], dtype=dtype, default_initializer=_zeros(), is_bias=True)
            if has_bias
            else None
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = reduce_from_group(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Layer):
    """Embedding whose rows ``[row_start, row_start + local_rows)`` live on this rank.

    Ids outside the local rows look up row 0 and are zeroed, so their gradient is zero
    too; the all-reduce adds the one rank that holds each id.
    """

    def __init__(self, local_rows: int, dim: int, row_start: int, group, dtype="float32"):
        super().__init__()
        self.group = group
        self.row_start = row_start
        self.row_stop = row_start + local_rows
        self.weight = _split_param(self, [local_rows, dim], dtype)

    def forward(self, ids: paddle.Tensor) -> paddle.Tensor:
        inside = (ids >= self.row_start) & (ids < self.row_stop)
        local_ids = paddle.where(inside, ids - self.row_start, paddle.zeros_like(ids))
        out = F.embedding(local_ids, self.weight)
        out = out * inside.unsqueeze(-1).astype(out.dtype)
        return reduce_from_group(out, self.group)

    def extra_repr(self) -> str:
        return f"rows=[{self.row_start}, {self.row_stop}), dim={self.weight.shape[1]}"


class ParallelLayerNorm(nn.Layer):
    """LayerNorm over a width split across ranks, with the statistics of the whole width.

    Two-pass (mean, then centred squares) in float32, as a LayerNorm kernel computes it;
    the one-pass ``E[x^2] - E[x]^2`` would cancel badly when the mean dominates.
    """

    def __init__(
        self,
        local_dim: int,
        full_dim: int,
        epsilon: float,
        group,
        has_weight: bool = True,
        has_bias: bool = True,
        dtype="float32",
    ):
        super().__init__()
        self.group = group
        self.full_dim = full_dim
        self.epsilon = epsilon
        self.weight = _split_param(self, [local_dim], dtype) if has_weight else None
        self.bias = _split_param(self, [local_dim], dtype, is_bias=True) if has_bias else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        dtype = x.dtype
        xf = x.astype("float32")
        mean = _sum_over_group(xf.sum(-1, keepdim=True), self.group) / self.full_dim
        centred = xf - mean
        var = _sum_over_group((centred * centred).sum(-1, keepdim=True), self.group) / self.full_dim
        y = centred * paddle.rsqrt(var + self.epsilon)
        if self.weight is not None:
            y = y * self.weight.astype("float32")
        if self.bias is not None:
            y = y + self.bias.astype("float32")
        return y.astype(dtype)

    def extra_repr(self) -> str:
        return f"local={self.weight.shape[0] if self.weight is not None else '?'}, full={self.full_dim}"


class ParallelRMSNorm(nn.Layer):
    """RMSNorm over a width split across ranks (the mean square all-reduced)."""

    def __init__(self, local_dim: int, full_dim: int, epsilon: float, group, dtype="float32"):
        super().__init__()
        self.group = group
        self.full_dim = full_dim
        self.epsilon = epsilon
        self.weight = _split_param(self, [local_dim], dtype)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        dtype = x.dtype
        xf = x.astype("float32")
        mean_sq = _sum_over_group((xf * xf).sum(-1, keepdim=True), self.group) / self.full_dim
        return (xf * paddle.rsqrt(mean_sq + self.epsilon) * self.weight.astype("float32")).astype(dtype)


# --------------------------------------------------------------------------- split rules


@dataclass(frozen=True)
class ShardRule:
    """How one tensor is split over the ranks.

    ``axis``: the split axis. ``blocks``: fused projections stored side by side along it
    (3 for q|k|v, 2 for SwiGLU's gate|value), each split on its own so every rank keeps the
    fused layout. ``unit``: columns that stay together (a head's width). ``what`` names the
    units in error messages.
    """

    axis: int
    blocks: int = 1
    unit: int = 1
    what: str = "columns"


_BLOCK_KEY = re.compile(r"(?:^|\.)(visual|text)\.transformer\.blocks\.\d+\.(attn|mlp)\.(.+)$")
_EMBED_KEY = re.compile(r"(?:^|\.)text\.token_embedding\.weight$")
_HEAD_LEAVES = {"q_bias", "v_bias", "norm.weight", "norm.bias"}
_HIDDEN_LEAVES = {"norm.weight", "norm.bias"}


def _check_attention_towers(cfg: CLIPConfig) -> None:
    for tower, sub in (("vision", cfg.vision), ("text", cfg.text)):
        if sub.block_type != "attention":
            raise ValueError(
                f"tensor parallelism splits attention towers; the {tower} tower has block_type="
                f"{sub.block_type!r}. Train Mixer models with data parallel / sharding only"
            )


def shard_rule(key: str, cfg: CLIPConfig) -> Optional[ShardRule]:
    """The split of state-dict entry ``key`` (any prefix), or ``None`` for a replicated one."""
    if _EMBED_KEY.search(key):
        return ShardRule(axis=0, what="vocabulary rows")
    match = _BLOCK_KEY.search(key)
    if match is None:
        return None
    tower, part, leaf = match.groups()
    if part == "attn":
        head_dim = cfg.vision.head_width if tower == "visual" else cfg.text.width // cfg.text.heads
        heads = dict(unit=head_dim, what="heads")
        if leaf == "qkv.weight":
            return ShardRule(axis=1, blocks=3, **heads)
        if leaf == "qkv.bias":
            return ShardRule(axis=0, blocks=3, **heads)
        if leaf == "proj.weight":
            return ShardRule(axis=0, **heads)
        return ShardRule(axis=0, **heads) if leaf in _HEAD_LEAVES else None
    fused = 2 if tower == "visual" and cfg.vision.naiveswiglu else 1
    hidden = dict(what="MLP hidden units")
    if leaf == "fc1.weight":
        return ShardRule(axis=1, blocks=fused, **hidden)
    if leaf == "fc1.bias":
        return ShardRule(axis=0, blocks=fused, **hidden)
    if leaf == "fc2.weight":
        return ShardRule(axis=0, **hidden)
    return ShardRule(axis=0, **hidden) if leaf in _HIDDEN_LEAVES else None


def _to_numpy(value) -> np.ndarray:
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def _blocked_shape(shape, rule: ShardRule, width: int) -> tuple:
    """``shape`` with the split axis viewed as ``[blocks, width]``."""
    return tuple(shape[: rule.axis]) + (rule.blocks, width) + tuple(shape[rule.axis + 1 :])


def _take_shard(key: str, array: np.ndarray, rule: ShardRule, rank: int, world_size: int) -> np.ndarray:
    full = array.shape[rule.axis]
    if full % rule.blocks != 0:
        raise ValueError(f"{key}: axis {rule.axis} of shape {array.shape} is not {rule.blocks} fused blocks")
    block = full // rule.blocks
    units = block // rule.unit
    if units % world_size != 0:
        raise ValueError(
            f"{key}: {units} {rule.what} cannot be split evenly over tensor-parallel degree {world_size}; "
            f"choose a degree that divides {units}"
        )
    local = block // world_size
    view = array.reshape(_blocked_shape(array.shape, rule, block))
    index = [slice(None)] * view.ndim
    index[rule.axis + 1] = slice(rank * local, (rank + 1) * local)
    shape = list(array.shape)
    shape[rule.axis] = rule.blocks * local
    return np.ascontiguousarray(view[tuple(index)]).reshape(shape)


def _join_shards(parts: Sequence[np.ndarray], rule: ShardRule) -> np.ndarray:
    local = parts[0].shape[rule.axis] // rule.blocks
    views = [p.reshape(_blocked_shape(p.shape, rule, local)) for p in parts]
    joined = np.concatenate(views, axis=rule.axis + 1)
    shape = list(parts[0].shape)
    shape[rule.axis] = rule.blocks * local * len(parts)
    return joined.reshape(shape)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def split_state_dict(
    full_sd: Mapping[str, object], rank: int, world_size: int, cfg: CLIPConfig
) -> Dict[str, np.ndarray]:
    """This rank's part of a degree-1 state dict (numpy arrays; replicated entries whole).

    Raises ``ValueError`` naming the tensor when a head count, MLP width or vocabulary is
    not divisible by ``world_size``.
    """
    _check_rank(rank, world_size)
    _check_attention_towers(cfg)
    out = {}
    for key, value in full_sd.items():
        array = _to_numpy(value)
        rule = shard_rule(key, cfg)
        out[key] = array if rule is None else _take_shard(key, array, rule, rank, world_size)
    return out


def merge_state_dicts(
    shards: Sequence[Mapping[str, object]], cfg: CLIPConfig, replica_atol: float = 1e-5
) -> Dict[str, np.ndarray]:
    """The degree-1 state dict from the per-rank state dicts, in rank order.

    Replicated entries must agree across ranks within ``replica_atol`` (absolute); a
    larger difference means the ranks diverged (unequal seeds or data inside a
    tensor-parallel group) and is an error rather than a silent pick of rank 0.
    bfloat16 tensors arrive from ``.numpy()`` as uint16 bit patterns, so for them any
    difference counts as divergence.
    """
    if not shards:
        raise ValueError("merge_state_dicts needs at least one shard")
    _check_attention_towers(cfg)
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            diff = sorted(set(shard) ^ set(keys))
            raise ValueError(f"shard {rank} has different keys from shard 0: {diff[:5]}")
    out = {}
    for key in keys:
        parts = [_to_numpy(shard[key]) for shard in shards]
        rule = shard_rule(key, cfg)
        if rule is not None:
            out[key] = _join_shards(parts, rule)
            continue
        for rank, part in enumerate(parts[1:], start=1):
            if part.shape != parts[0].shape:
                raise ValueError(
                    f"{key}: replicated tensor has shape {part.shape} on rank {rank}, {parts[0].shape} on rank 0"
                )
            gap = float(np.max(np.abs(part.astype(np.float64) - parts[0].astype(np.float64)), initial=0.0))
            if gap > replica_atol:
                raise ValueError(
                    f"{key}: replicated tensor differs between rank 0 and rank {rank} by {gap:.3g} "
                    f"(> replica_atol={replica_atol}); the tensor-parallel ranks diverged"
                )
        out[key] = parts[0]
    return out


def gather_full_state_dict(
    tensors: Mapping[str, paddle.Tensor], cfg: CLIPConfig, group, world_size: int, replica_atol: float = 1e-5
) -> Dict[str, np.ndarray]:
    """All-gather per-rank tensors (a state dict, or gradients by parameter name) and merge.

    Collective: every rank of ``group`` must call it with the same keys in the same order,
    and every rank receives the merged degree-1 dict (save it from one rank).
    """
    shards: List[Dict[str, np.ndarray]] = [{} for _ in range(world_size)]
    for key, tensor in tensors.items():
        parts: List[paddle.Tensor] = []
        dist.all_gather(parts, tensor, group=group)
        if len(parts) != world_size:
            raise ValueError(f"gathered {len(parts)} parts of {key} from a group passed as world_size={world_size}")
        for rank, part in enumerate(parts):
            shards[rank][key] = part.numpy()
    return merge_state_dicts(shards, cfg, replica_atol=replica_atol)


# --------------------------------------------------------------------------- conversion


def _parallel_norm(norm: nn.Layer, local_dim: int, group) -> nn.Layer:
    if isinstance(norm, RMSNorm):
        return ParallelRMSNorm(local_dim, norm.weight.shape[0], norm.epsilon, group, dtype=norm.weight.dtype)
    if isinstance(norm, nn.LayerNorm):
        ref = norm.weight if norm.weight is not None else norm.bias
        return ParallelLayerNorm(
            local_dim,
            int(norm._normalized_shape[-1]),
            norm._epsilon,
            group,
            has_weight=norm.weight is not None,
            has_bias=norm.bias is not None,
            dtype=ref.dtype if ref is not None else "float32",
        )
    raise TypeError(f"cannot split a sub-LN norm of type {type(norm).__name__}; expected LayerNorm or RMSNorm")


def _parallelize_attention(attn: Attention, group, world_size: int) -> None:
    if attn.attn_drop > 0:
        raise NotImplementedError(
            f"attention-probability dropout ({attn.attn_drop}) under tensor parallelism would repeat one "
            "mask on every rank's heads; set it to 0"
        )
    dtype = attn.qkv.weight.dtype
    local_heads = attn.num_heads // world_size
    local = local_heads * attn.head_dim
    attn.qkv = ColumnParallelLinear(attn.dim, 3 * local, attn.qkv.bias is not None, group, dtype)
    if attn.qkv_bias_mode == "qv":
        attn.q_bias = _split_param(attn, [local], dtype, is_bias=True)
        attn.v_bias = _split_param(attn, [local], dtype, is_bias=True)
    if not isinstance(attn.norm, nn.Identity):
        attn.norm = _parallel_norm(attn.norm, local, group)
    attn.proj = RowParallelLinear(local, attn.dim, attn.proj.bias is not None, group, dtype)
    attn.num_heads = local_heads


def _parallelize_mlp(mlp: nn.Layer, group, world_size: int) -> None:
    if not isinstance(mlp, (Mlp, SwiGLU)):
        raise TypeError(f"cannot split an MLP of type {type(mlp).__name__}")
    if not isinstance(mlp.drop, nn.Identity):
        raise NotImplementedError(
            "MLP dropout under tensor parallelism would repeat one mask on every rank's hidden units; set it to 0"
        )
    dtype = mlp.fc1.weight.dtype
    dim, hidden = mlp.fc2.weight.shape[1], mlp.fc2.weight.shape[0]
    local = hidden // world_size
    fused = 2 if isinstance(mlp, SwiGLU) else 1
    mlp.fc1 = ColumnParallelLinear(dim, fused * local, mlp.fc1.bias is not None, group, dtype)
    if not isinstance(mlp.norm, nn.Identity):
        mlp.norm = _parallel_norm(mlp.norm, local, group)
    mlp.fc2 = RowParallelLinear(local, dim, mlp.fc2.bias is not None, group, dtype)
    if isinstance(mlp, SwiGLU):
        mlp.hidden_dim = local


def _parallelize_embedding(embedding: nn.Embedding, group, rank: int, world_size: int) -> nn.Layer:
    if embedding._padding_idx is not None:
        raise NotImplementedError("a vocab-parallel embedding with padding_idx is not supported")
    rows, dim = embedding.weight.shape
    local = rows // world_size
    return VocabParallelEmbedding(local, dim, rank * local, group, dtype=embedding.weight.dtype)


def _check_group(group, rank: int, world_size: int) -> None:
    if group is None:
        raise ValueError("tensor_parallelize needs the tensor-parallel process group explicitly, got None")
    if (group.rank, group.nranks) != (rank, world_size):
        raise ValueError(
            f"rank={rank}, world_size={world_size} disagree with the group (rank {group.rank} of {group.nranks}); "
            "pass this process's place in the tensor-parallel group"
        )


def tensor_parallelize(model: nn.Layer, group, rank: int, world_size: int) -> nn.Layer:
    """Convert a built (and loaded) degree-1 CLIP in place to this rank's tensor-parallel part.

    ``group`` is the tensor-parallel process group; ``rank`` / ``world_size`` this process's
    place in it. Every rank must call it on the same weights. ``world_size == 1`` leaves the
    model unchanged. Returns ``model``.
    """
    _check_rank(rank, world_size)
    if world_size == 1:
        return model
    _check_group(group, rank, world_size)
    towers = (model.visual, model.text)
    if not isinstance(towers[0], VisionTransformer) or not isinstance(towers[1], TextTransformer):
        raise TypeError(
            f"tensor parallelism needs ViT / text-transformer towers, got {type(towers[0]).__name__} / "
            f"{type(towers[1]).__name__}"
        )
    if isinstance(model.text.token_embedding, VocabParallelEmbedding):
        raise ValueError("the model is already tensor-parallel; convert a degree-1 model once")
    trainable = {name: not p.stop_gradient for name, p in model.named_parameters()}
    # Split first: a degree that does not divide the heads fails before any layer changes.
    shard = split_state_dict(model.state_dict(), rank, world_size, model.config)
    for tower in towers:
        for block in tower.transformer.blocks:
            _parallelize_attention(block.attn, group, world_size)
            _parallelize_mlp(block.mlp, group, world_size)
    model.text.token_embedding = _parallelize_embedding(model.text.token_embedding, group, rank, world_size)
    _load_exact(model, shard)
    for name, param in model.named_parameters():
        param.stop_gradient = not trainable[name]
    logger.info("tensor-parallel rank %d of %d: %d split tensors", rank, world_size,
                sum(shard_rule(k, model.config) is not None for k in shard))
    return model


def _load_exact(model: nn.Layer, shard: Mapping[str, np.ndarray]) -> None:
    """Fill every entry of the converted model from ``shard``, requiring equal keys and shapes."""
    state = model.state_dict()
    if set(state) != set(shard):
        diff = sorted(set(state) ^ set(shard))[:5]
        raise RuntimeError(f"converted model and split state dict disagree on keys: {diff}")
    for key, tensor in state.items():
        if list(tensor.shape) != list(shard[key].shape):
            raise RuntimeError(f"{key}: layer shape {list(tensor.shape)} but split shape {list(shard[key].shape)}")
        tensor.set_value(shard[key])
