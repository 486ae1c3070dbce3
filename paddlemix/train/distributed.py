"""Differentiable gathers for contrastive losses over the data world.

A contrastive loss needs every rank's features, but each feature's gradient must end
on the rank that produced it. :func:`gather_with_grad` concatenates the features of all
ranks in ``group`` and, in backward, sums the incoming gradients over the ranks and
hands each rank the slice of its own rows (reduce-scatter semantics). With that, a
data-parallel step whose gradients are averaged over ranks equals one process with the
global batch (see :mod:`paddlemix.train.loss`).

The group is always an explicit argument: with sharding, the data world is the
data-parallel x sharding ranks, which is not Paddle's global group, and guessing it
from global state is how a loss silently contrasts the wrong batch.

All ranks must pass tensors of the same shape (a collective all_gather needs it), so
the data loader must drop or pad a ragged last batch.
"""
from __future__ import annotations

from typing import Optional

import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

__all__ = ["gather_with_grad", "gather_no_grad", "group_rank_and_size"]


def group_rank_and_size(group: Optional[dist.collective.Group]) -> tuple:
    """``(rank, world_size)`` of this process inside ``group`` (``None``: the global group)."""
    if group is None:
        return dist.get_rank(), dist.get_world_size()
    return group.rank, group.nranks


def _all_gather(x: paddle.Tensor, group) -> paddle.Tensor:
    parts: list = []
    dist.all_gather(parts, x, group=group)
    return paddle.concat(parts, axis=0)


class _GatherWithGrad(PyLayer):
    """All-gather along axis 0 whose backward is a sum over ranks, then this rank's rows.

    Gloo (CPU) has no reduce_scatter, so the backward is an all_reduce followed by a
    slice: the same numbers, at ``world_size`` times the traffic of a reduce_scatter.
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, rank: int, world_size: int, group):
        ctx.rank = rank
        ctx.rows = x.shape[0]
        ctx.group = group
        out = _all_gather(x, group)
        if out.shape[0] != ctx.rows * world_size:
            raise ValueError(
                f"gathered {out.shape[0]} rows from {world_size} ranks of {ctx.rows} rows each; "
                "every rank must pass the same local batch size (drop the last ragged batch)"
            )
        return out

    @staticmethod
    def backward(ctx, grad: paddle.Tensor):
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return total[start : start + ctx.rows]


def gather_with_grad(x: paddle.Tensor, rank: int, world_size: int, group=None) -> paddle.Tensor:
    """Concatenate ``x`` of every rank along axis 0; gradients flow back to their owners.

    ``rank`` and ``world_size`` are this process's place in ``group``; they are passed in
    (not looked up) so the caller states which world the loss spans.
    """
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x, rank, world_size, group)


def gather_no_grad(x: paddle.Tensor, rank: int, world_size: int, group=None) -> paddle.Tensor:
    """Concatenate ``x`` of every rank; only this rank's own rows keep their gradient.

    Cheaper than :func:`gather_with_grad` (no backward collective), but the other ranks'
    rows are constants, so the gradient is not the full-batch gradient.
    """
    if world_size == 1:
        return x
    with paddle.no_grad():
        gathered = _all_gather(x.detach(), group)
    rows = x.shape[0]
    parts = [gathered[:rank * rows], x, gathered[(rank + 1) * rows :]]
    return paddle.concat([p for p in parts if p.shape[0] > 0], axis=0)
