"""Readers and writers of the weights formats, one module per format.

- :mod:`.safetensors`: header validation, then reading (views of the mapped file) and writing.
- :mod:`.safe_pickle`: the restricted unpickler that every pickle format goes through.
- :mod:`.torch_pickle`: torch zip and legacy checkpoints, read without torch.
- :mod:`.pdparams`: pickles of numpy arrays (Paddle ``.pdparams``, array datasets).
- :mod:`.lazy`: :class:`LazyArray`, :func:`release` and bfloat16 bits, shared by all of them.
- :mod:`.common`: :class:`CheckpointError` and read-only file mapping.

Format detection, directories, index files and unwrapping are in :mod:`paddlemix.zoo.checkpoint`.
"""
from .common import CheckpointError
from .lazy import LazyArray, release, to_bfloat16_bits
from .pdparams import load_array_pickle
from .safetensors import safetensors_metadata, save_safetensors, save_safetensors_sharded

__all__ = [
    "CheckpointError",
    "LazyArray",
    "load_array_pickle",
    "release",
    "safetensors_metadata",
    "save_safetensors",
    "save_safetensors_sharded",
    "to_bfloat16_bits",
]
