"""Contrastive (CLIP) and sigmoid (SigLIP) losses over a data-parallel world.

Gradient contract: every rank returns a loss whose gradient, averaged over the ranks
the way data parallel averages parameter gradients, equals the gradient of the same
loss computed by one process on the concatenated global batch. This holds exactly for
``ClipLoss(gather_with_grad=True)`` (with or without ``local_loss``) and for
``SigLipLoss``:

* ``local_loss=True``: rank ``r`` computes the mean cross-entropy of its own ``b`` rows
  against all ``W * b`` columns, so the global loss is the mean of the rank losses and
  averaging rank gradients gives its gradient.
* ``local_loss=False``: every rank computes the whole ``N x N`` loss; the gather's
  backward sums ``W`` identical contributions onto each owner, and the average over
  ``W`` ranks cancels that factor.

``gather_with_grad=False`` treats the other ranks' features as constants: cheaper, and
the loss value is unchanged, but the gradient is not the full-batch gradient.

Logits and losses are computed in float32 even under AMP: a logit scale of 100 in
bfloat16 has a resolution of 0.5, too coarse for a softmax over a large batch.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .distributed import gather_no_grad, gather_with_grad

__all__ = ["ClipLoss", "SigLipLoss"]


def _check_world(rank: int, world_size: int, group) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if group is not None and (group.nranks != world_size or group.rank != rank):
        raise ValueError(
            f"rank={rank}, world_size={world_size} do not match the group (rank {group.rank} of "
            f"{group.nranks}); pass this process's rank and size inside the data-world group"
        )


def _fp32(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.dtype == paddle.float32 else x.astype("float32")


def _cross_entropy(logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
    """Mean ``logsumexp(row) - row[label]``.

    Not ``F.cross_entropy``: Paddle's CPU softmax clamps log-probabilities at -64, which
    caps a row's loss at 64 when a pair trails the best logit by more than 64 (reachable
    with a logit scale of 100); ``logsumexp`` has no clamp.
    """
    picked = paddle.take_along_axis(logits, labels.unsqueeze(1), axis=1).squeeze(1)
    return (paddle.logsumexp(logits, axis=1) - picked).mean()


class ClipLoss(nn.Layer):
    """Symmetric InfoNCE over image-text pairs; row ``i`` matches column ``i``.

    Args:
        local_loss: each rank scores only its own rows against the global columns
            (labels offset by ``rank * local_batch``): ``O(b * N)`` logits instead of
            ``O(N * N)``. Needs ``gather_with_grad=True`` for full-batch gradients.
        gather_with_grad: gather features with a backward that returns the other ranks'
            gradient contributions to their owners.
        cache_labels: keep the label vector between steps of equal batch size.
        rank, world_size, group: this process's place in the data world
            (data-parallel x sharding ranks); ``group=None`` is Paddle's global group.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = True,
        rank: int = 0,
        world_size: int = 1,
        group=None,
    ):
        super().__init__()
        _check_world(rank, world_size, group)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self._labels: Dict[int, paddle.Tensor] = {}

    def _gather(self, x: paddle.Tensor) -> paddle.Tensor:
        fn = gather_with_grad if self.gather_with_grad else gather_no_grad
        return fn(x, self.rank, self.world_size, self.group)

    def labels(self, num_rows: int) -> paddle.Tensor:
        """Target column of each logit row: the row's position in the global batch."""
        labels = self._labels.get(num_rows)
        if labels is None:
            offset = num_rows * self.rank if self.local_loss and self.world_size > 1 else 0
            labels = paddle.arange(offset, offset + num_rows, dtype="int64")
            if self.cache_labels:
                self._labels[num_rows] = labels
        return labels

    def get_logits(
        self, image_features: paddle.Tensor, text_features: paddle.Tensor, logit_scale: paddle.Tensor
    ) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """``(logits_per_image, logits_per_text)`` in float32; see the class for the shapes."""
        if self.world_size == 1:
            all_image, all_text = image_features, text_features
        else:
            # Gather in the features' own dtype (half the traffic under AMP), then upcast.
            all_image, all_text = self._gather(image_features), self._gather(text_features)
        all_image, all_text, logit_scale = _fp32(all_image), _fp32(all_text), _fp32(logit_scale)
        if self.local_loss and self.world_size > 1:
            per_image = logit_scale * paddle.matmul(_fp32(image_features), all_text, transpose_y=True)
            per_text = logit_scale * paddle.matmul(_fp32(text_features), all_image, transpose_y=True)
            return per_image, per_text
        per_image = logit_scale * paddle.matmul(all_image, all_text, transpose_y=True)
        return per_image, per_image.T

    def forward(
        self, image_features: paddle.Tensor, text_features: paddle.Tensor, logit_scale: paddle.Tensor
    ) -> paddle.Tensor:
        """Scalar loss; ``logit_scale`` is the multiplier itself (``exp`` already applied)."""
        with paddle.amp.auto_cast(enable=False):
            per_image, per_text = self.get_logits(image_features, text_features, logit_scale)
            labels = self.labels(per_image.shape[0])
            return (_cross_entropy(per_image, labels) + _cross_entropy(per_text, labels)) / 2


class SigLipLoss(nn.Layer):
    """Pairwise sigmoid loss (SigLIP): every image-text pair is a binary decision.

    ``loss = -sum_ij log sigmoid(y_ij * (scale * <x_i, t_j> + bias)) / b`` with
    ``y_ij = +1`` for matching pairs and ``-1`` otherwise, summed over this rank's ``b``
    images against the texts of all ranks, divided by the local batch ``b``. The global
    loss is the mean of the rank losses, so averaged rank gradients are its gradient.

    ``dist_impl='gather'`` all-gathers the text features with
    :func:`~paddlemix.train.distributed.gather_with_grad`; it is the only implementation
    (neighbour exchange needs point-to-point ops that gloo does not offer on CPU).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group=None, dist_impl: str = "gather"):
        super().__init__()
        _check_world(rank, world_size, group)
        if dist_impl != "gather":
            raise ValueError(f"SigLipLoss dist_impl must be 'gather', got {dist_impl!r}")
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.dist_impl = dist_impl

    def signs(self, num_rows: int, num_cols: int) -> paddle.Tensor:
        """``y``: +1 where image row ``i`` meets its own text in the global columns, else -1."""
        offset = num_rows * self.rank
        cols = paddle.arange(num_cols, dtype="int64").unsqueeze(0)
        rows = paddle.arange(offset, offset + num_rows, dtype="int64").unsqueeze(1)
        return paddle.where(rows == cols, paddle.ones([], "float32"), -paddle.ones([], "float32"))

    def forward(
        self,
        image_features: paddle.Tensor,
        text_features: paddle.Tensor,
        logit_scale: paddle.Tensor,
        logit_bias: Optional[paddle.Tensor],
    ) -> paddle.Tensor:
        """Scalar loss; ``logit_scale`` is the multiplier itself (``exp`` already applied)."""
        with paddle.amp.auto_cast(enable=False):
            all_text = _fp32(gather_with_grad(text_features, self.rank, self.world_size, self.group))
            logits = _fp32(logit_scale) * paddle.matmul(_fp32(image_features), all_text, transpose_y=True)
            if logit_bias is not None:
                logits = logits + _fp32(logit_bias)
            y = self.signs(logits.shape[0], logits.shape[1])
            return -F.log_sigmoid(y * logits).sum() / image_features.shape[0]
