"""``paddlemix.inference_mode(model)``: a block that runs ``model`` without gradients, its linear
layers on weights packed once for the CPU's GEMM.

The counterpart of ``torch.inference_mode()`` for one model::

    with paddlemix.inference_mode(model):
        image_features = model.encode_image(image)

Inside the block no gradient is recorded (``paddle.no_grad()``), and each of the model's linear
layers holds a :class:`~paddlemix.kernels.dispatch.PackedWeight`: on a CPU, in float32, its
weight is packed into MKL's GEMM layout at the layer's first call and multiplied from there,
instead of being repacked inside every GEMM. The packs are freed when the block ends.

Why a block and not the default: a pack is a second copy of the weight (the used layers' weights
take twice their memory during the block), and it cannot see every change to the weight. Paddle's
``set_value``, ``set_state_dict`` and optimizer steps write a parameter's storage without marking
it changed, so inside the block the weights must stay as they are (an in-place Paddle op such as
``add_`` or ``copy_``, or a replaced parameter, is seen and repacks). The block states that
contract where the code runs. MKL's packed kernels give the unpacked GEMM's bits for most shapes
and differ in the last bit for some (for example one row, or a long inner dimension with few
rows), within float32 rounding.

Without the kernel library's packed operators (not built, or a Paddle without MKL), on a GPU or
in another dtype, the block is ``paddle.no_grad()`` and the usual kernels run.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import paddle
import paddle.nn as nn

from ..kernels import dispatch
from .layers import Linear

__all__ = ["inference_mode"]


@contextlib.contextmanager
def inference_mode(model: nn.Layer) -> Iterator[nn.Layer]:
    """Run ``model`` inside the block without gradients and with its linear layers' weights packed
    for the CPU's GEMM (see the module docstring for the contract: weights stay fixed inside).

    Yields ``model``. Nested blocks over the same layers keep the outer block's packs.
    """
    if not isinstance(model, nn.Layer):
        raise TypeError(f"inference_mode takes a paddle.nn.Layer (the model), got {type(model).__name__}")
    holders: List[Linear] = []
    for layer in model.sublayers(include_self=True):
        # Exactly Linear: tensor-parallel subclasses run their own forward, which packs nothing.
        if type(layer) is Linear and layer.packed is None:
            layer.packed = dispatch.PackedWeight()
            holders.append(layer)
    try:
        with paddle.no_grad():
            yield model
    finally:
        for layer in holders:
            layer.packed = None
