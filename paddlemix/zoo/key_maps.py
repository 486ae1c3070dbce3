"""Translate reference state dicts (open_clip, EVA-CLIP, HF transformers) into this project's layout.

All functions work on ``Dict[str, np.ndarray]`` so conversion needs neither torch nor
a built model. Paddle's ``Linear`` stores ``[in, out]`` where torch stores
``[out, in]``, so every torch linear weight is transposed; every rule below says
whether it transposes, instead of guessing from shapes (square matrices would be
ambiguous). Split q/k/v projections are fused into the single ``qkv`` matmul.

Conversion is planned from names and shapes alone: every output that needs computing is a
:class:`~paddlemix.zoo.formats.lazy.LazyArray`, so ``convert_state_dict(..., lazy=True)`` over
a memory-mapped checkpoint reads nothing, and a streaming loader pays for one converted
tensor at a time.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import PaddleMIXError
from .formats.lazy import LazyArray, bf16_bits_to_float32

__all__ = ["detect_layout", "convert_state_dict", "convert_shards", "resize_pos_embed", "hf_config_to_model_cfg", "ConversionError"]

StateDict = Dict[str, np.ndarray]


class ConversionError(PaddleMIXError, ValueError):
    """A checkpoint whose keys do not match any known layout, or that the rules cannot map."""


def detect_layout(sd: StateDict) -> str:
    """Name the layout of a state dict: 'paddlemix', 'paddlemix_legacy', 'hf', 'eva', 'open_clip'."""
    keys = set(sd)
    if _is_paddlemix_legacy(sd):
        return "paddlemix_legacy"
    if any(k.startswith("vision_model.") or k.startswith("text_model.") for k in keys):
        return "hf"
    if any(k.startswith("visual.transformer.blocks.") or k.startswith("text.transformer.blocks.") for k in keys):
        return "paddlemix"
    if any(k.startswith("visual.blocks.") for k in keys):
        return "eva"
    if any(k.startswith("visual.transformer.resblocks.") or "transformer.resblocks." in k for k in keys):
        return "open_clip"
    sample = sorted(keys)[:8]
    raise ConversionError(
        f"cannot tell which model family this checkpoint is from (first keys: {sample}); "
        "expected open_clip, EVA-CLIP, HF transformers CLIP or paddlemix keys"
    )


_TRANSPOSE_TILE = 256


def _transpose_into(out: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``out[...] = x.T`` tile by tile: a plain strided copy of a big matrix misses the cache on
    nearly every element and costs several times the tiled one. ``out`` may have another
    dtype; values are cast as they are written."""
    rows, cols = x.shape
    for i in range(0, rows, _TRANSPOSE_TILE):
        for j in range(0, cols, _TRANSPOSE_TILE):
            out[j:j + _TRANSPOSE_TILE, i:i + _TRANSPOSE_TILE] = x[i:i + _TRANSPOSE_TILE, j:j + _TRANSPOSE_TILE].T
    return out


def _t(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        return np.ascontiguousarray(x.T)
    return _transpose_into(np.empty(x.shape[::-1], dtype=x.dtype), x)


def _concat0(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=0)


def _concat_t(*parts: np.ndarray) -> np.ndarray:
    return _t(np.concatenate(parts, axis=0))


def _concat_last(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=parts[0].ndim - 1)


def _pieces(start: int, stop: int, count: int, fn: Optional[Callable] = None) -> Callable:
    """Cut an array into ``count`` equal parts along its first axis and keep parts ``start:stop``."""

    def cut(x: np.ndarray) -> np.ndarray:
        step = x.shape[0] // count
        piece = x[start * step:stop * step]
        return fn(piece) if fn is not None else piece

    return cut


# ----------------------------------------------------------------------------------------------
# Per-block rules. Each rule: (source suffix, target suffix, transpose?).
_OPEN_CLIP_BLOCK: List[Tuple[str, str, bool]] = [
    ("ln_1.weight", "norm1.weight", False),
    ("ln_1.bias", "norm1.bias", False),
    ("ln_2.weight", "norm2.weight", False),
    ("ln_2.bias", "norm2.bias", False),
    ("attn.in_proj_weight", "attn.qkv.weight", True),
    ("attn.in_proj_bias", "attn.qkv.bias", False),
    ("attn.out_proj.weight", "attn.proj.weight", True),
    ("attn.out_proj.bias", "attn.proj.bias", False),
    ("mlp.c_fc.weight", "mlp.fc1.weight", True),
    ("mlp.c_fc.bias", "mlp.fc1.bias", False),
    ("mlp.c_proj.weight", "mlp.fc2.weight", True),
    ("mlp.c_proj.bias", "mlp.fc2.bias", False),
    ("ls_1.gamma", "ls1.gamma", False),
    ("ls_2.gamma", "ls2.gamma", False),
]

_EVA_BLOCK: List[Tuple[str, str, bool]] = [
    ("norm1.weight", "norm1.weight", False),
    ("norm1.bias", "norm1.bias", False),
    ("norm2.weight", "norm2.weight", False),
    ("norm2.bias", "norm2.bias", False),
    ("attn.qkv.weight", "attn.qkv.weight", True),
    ("attn.q_bias", "attn.q_bias", False),
    ("attn.v_bias", "attn.v_bias", False),
    ("attn.inner_attn_ln.weight", "attn.norm.weight", False),
    ("attn.inner_attn_ln.bias", "attn.norm.bias", False),
    ("attn.proj.weight", "attn.proj.weight", True),
    ("attn.proj.bias", "attn.proj.bias", False),
    ("mlp.fc1.weight", "mlp.fc1.weight", True),
    ("mlp.fc1.bias", "mlp.fc1.bias", False),
    ("mlp.fc2.weight", "mlp.fc2.weight", True),
    ("mlp.fc2.bias", "mlp.fc2.bias", False),
    ("mlp.ffn_ln.weight", "mlp.norm.weight", False),
    ("mlp.ffn_ln.bias", "mlp.norm.bias", False),
    ("mlp.w3.weight", "mlp.fc2.weight", True),
    ("mlp.w3.bias", "mlp.fc2.bias", False),
    ("gamma_1", "ls1.gamma", False),
    ("gamma_2", "ls2.gamma", False),
]

_HF_BLOCK: List[Tuple[str, str, bool]] = [
    ("layer_norm1.weight", "norm1.weight", False),
    ("layer_norm1.bias", "norm1.bias", False),
    ("layer_norm2.weight", "norm2.weight", False),
    ("layer_norm2.bias", "norm2.bias", False),
    ("self_attn.out_proj.weight", "attn.proj.weight", True),
    ("self_attn.out_proj.bias", "attn.proj.bias", False),
    ("mlp.fc1.weight", "mlp.fc1.weight", True),
    ("mlp.fc1.bias", "mlp.fc1.bias", False),
    ("mlp.fc2.weight", "mlp.fc2.weight", True),
    ("mlp.fc2.bias", "mlp.fc2.bias", False),
]


class _Mapper:
    """Pops keys from a source dict into a target dict; leftovers are reported as unknown."""

    def __init__(self, sd: StateDict):
        self.src = dict(sd)
        self.out: StateDict = {}

    def move(self, src: str, dst: str, fn: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> bool:
        if src not in self.src:
            return False
        value = self.src.pop(src)
        shape = getattr(value, "shape", None)
        if fn is _t and shape is not None and len(shape) == 2:  # a loader can transpose straight into a parameter
            self.out[dst] = LazyArray(_t, value, shape=tuple(shape[::-1]), into=_transpose_into)
        else:
            self.out[dst] = LazyArray(fn, value) if fn is not None else value
        return True

    def block(self, src_prefix: str, dst_prefix: str, rules: List[Tuple[str, str, bool]]) -> None:
        for s, d, transpose in rules:
            self.move(src_prefix + s, dst_prefix + d, _t if transpose else None)

    def fuse_qkv(self, names: List[str], dst: str, transpose: bool) -> None:
        if all(n in self.src for n in names):
            parts = [self.src.pop(n) for n in names]
            self.out[dst] = LazyArray(_concat_t if transpose else _concat0, *parts)

    def fuse_qkv_axis1(self, names: List[str], dst: str) -> None:
        """Concatenate Paddle-oriented ([in, out]) parts along the output axis (1-D: biases)."""
        if all(n in self.src for n in names):
            self.out[dst] = LazyArray(_concat_last, *[self.src.pop(n) for n in names])

    def derive(self, src: str, outputs: Dict[str, Callable[[np.ndarray], np.ndarray]]) -> None:
        """Several targets computed from one source tensor (a packed matrix cut into parts)."""
        value = self.src.pop(src)
        for dst, fn in outputs.items():
            self.out[dst] = LazyArray(fn, value)

    def drop(self, pattern: str) -> None:
        for k in [k for k in self.src if re.fullmatch(pattern, k)]:
            del self.src[k]

    def finish(self, layout: str) -> StateDict:
        if self.src:
            raise ConversionError(
                f"{layout} checkpoint has keys no conversion rule knows: {sorted(self.src)[:20]}"
                f"{' ...' if len(self.src) > 20 else ''}"
            )
        return self.out


def _block_indices(keys, prefix: str) -> List[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _clip_text(m: _Mapper, src: str, legacy: bool = False) -> None:
    """open_clip's text tower; ``src`` is '' (flattened CLIP) or 'text.' (CustomTextCLIP / EVA).

    ``legacy``: PaddleMIX's port of it (split q/k/v, [in, out] weights, projection a parameter).
    """
    for name in ("token_embedding.weight", "positional_embedding", "cls_emb", "ln_final.weight", "ln_final.bias"):
        m.move(src + name, "text." + name)
    if legacy or not m.move(src + "text_projection.weight", "text.text_projection.weight", _t):
        m.move(src + "text_projection", "text.text_projection.weight")
    if not legacy:
        m.move(src + "text_projection.bias", "text.text_projection.bias")
    m.drop(re.escape(src) + r"attn_mask")
    for i in _block_indices(m.src, src + "transformer.resblocks."):
        s, d = f"{src}transformer.resblocks.{i}.", f"text.transformer.blocks.{i}."
        m.block(s, d, _LEGACY_CLIP_BLOCK if legacy else _OPEN_CLIP_BLOCK)
        if legacy:
            _legacy_attn(m, s, d)


def _text_prefix(m: _Mapper) -> str:
    """'text.' when the text tower is a submodule (CustomTextCLIP, EVA), '' when flattened into CLIP."""
    return "text." if any(k.startswith("text.") for k in m.src) else ""


def _clip_vision_stem(m: _Mapper) -> None:
    """Everything of open_clip's ViT outside its blocks (the same names in PaddleMIX's port)."""
    m.move("visual.conv1.weight", "visual.patch_embed.weight")
    m.move("visual.class_embedding", "visual.class_embedding")
    m.move("visual.positional_embedding", "visual.positional_embedding")
    m.move("visual.ln_pre.weight", "visual.norm_pre.weight")
    m.move("visual.ln_pre.bias", "visual.norm_pre.bias")
    m.move("visual.ln_post.weight", "visual.norm.weight")
    m.move("visual.ln_post.bias", "visual.norm.bias")
    m.move("visual.proj", "visual.head.weight")


def _eva_vision_stem(m: _Mapper, head_fn: Optional[Callable[[np.ndarray], np.ndarray]]) -> None:
    """Everything of EVA-CLIP's ViT outside its blocks; ``head_fn`` orients the head weight."""
    m.move("visual.patch_embed.proj.weight", "visual.patch_embed.weight")
    m.move("visual.patch_embed.proj.bias", "visual.patch_embed.bias")
    m.move("visual.cls_token", "visual.class_embedding", lambda x: x.reshape(-1))
    m.move("visual.pos_embed", "visual.positional_embedding", lambda x: x.reshape(x.shape[-2], x.shape[-1]))
    for norm in ("norm", "fc_norm"):
        m.move(f"visual.{norm}.weight", "visual.norm.weight")
        m.move(f"visual.{norm}.bias", "visual.norm.bias")
    m.move("visual.head.weight", "visual.head.weight", head_fn)
    m.move("visual.head.bias", "visual.head.bias")
    m.drop(r"visual\.rope\.freqs_(cos|sin)")


def _convert_open_clip(sd: StateDict) -> StateDict:
    m = _Mapper(sd)
    _clip_vision_stem(m)
    for i in _block_indices(m.src, "visual.transformer.resblocks."):
        m.block(f"visual.transformer.resblocks.{i}.", f"visual.transformer.blocks.{i}.", _OPEN_CLIP_BLOCK)
    # CoCa-style attentional pooler (nn.MultiheadAttention with kdim != embed_dim keeps separate weights).
    p = "visual.attn_pool."
    m.move(p + "query", "visual.attn_pool.query")
    for ln in ("ln_q", "ln_k"):
        m.move(f"{p}{ln}.weight", f"visual.attn_pool.{ln}.weight")
        m.move(f"{p}{ln}.bias", f"visual.attn_pool.{ln}.bias")
    m.move(p + "attn.out_proj.weight", "visual.attn_pool.out_proj.weight", _t)
    m.move(p + "attn.out_proj.bias", "visual.attn_pool.out_proj.bias")
    m.move(p + "attn.q_proj_weight", "visual.attn_pool.q_proj.weight", _t)
    m.fuse_qkv([p + "attn.k_proj_weight", p + "attn.v_proj_weight"], "visual.attn_pool.kv_proj.weight", True)
    if p + "attn.in_proj_bias" in m.src:  # packed [q; k; v]
        m.derive(p + "attn.in_proj_bias", {
            "visual.attn_pool.q_proj.bias": _pieces(0, 1, 3), "visual.attn_pool.kv_proj.bias": _pieces(1, 3, 3),
        })
    if p + "attn.in_proj_weight" in m.src:  # kdim == d_model: one packed matrix
        m.derive(p + "attn.in_proj_weight", {
            "visual.attn_pool.q_proj.weight": _pieces(0, 1, 3, fn=_t),
            "visual.attn_pool.kv_proj.weight": _pieces(1, 3, 3, fn=_t),
        })
    _clip_text(m, _text_prefix(m))
    m.move("logit_scale", "logit_scale")
    m.move("logit_bias", "logit_bias")
    return m.finish("open_clip")


def _convert_eva(sd: StateDict) -> StateDict:
    m = _Mapper(sd)
    _eva_vision_stem(m, _t)
    for i in _block_indices(m.src, "visual.blocks."):
        src, dst = f"visual.blocks.{i}.", f"visual.transformer.blocks.{i}."
        m.block(src, dst, _EVA_BLOCK)
        m.fuse_qkv([src + f"attn.{n}_proj.weight" for n in "qkv"], dst + "attn.qkv.weight", True)
        m.fuse_qkv([src + "mlp.w1.weight", src + "mlp.w2.weight"], dst + "mlp.fc1.weight", True)
        m.fuse_qkv([src + "mlp.w1.bias", src + "mlp.w2.bias"], dst + "mlp.fc1.bias", False)
    _clip_text(m, "text.")
    m.move("logit_scale", "logit_scale")
    return m.finish("EVA-CLIP")


def _convert_hf(sd: StateDict) -> StateDict:
    m = _Mapper(sd)
    v, t = "vision_model.", "text_model."
    m.move(v + "embeddings.patch_embedding.weight", "visual.patch_embed.weight")
    m.move(v + "embeddings.class_embedding", "visual.class_embedding")
    m.move(v + "embeddings.position_embedding.weight", "visual.positional_embedding")
    m.move(v + "pre_layrnorm.weight", "visual.norm_pre.weight")
    m.move(v + "pre_layrnorm.bias", "visual.norm_pre.bias")
    m.move(v + "post_layernorm.weight", "visual.norm.weight")
    m.move(v + "post_layernorm.bias", "visual.norm.bias")
    m.move("visual_projection.weight", "visual.head.weight", _t)
    m.move(t + "embeddings.token_embedding.weight", "text.token_embedding.weight")
    m.move(t + "embeddings.position_embedding.weight", "text.positional_embedding")
    m.move(t + "final_layer_norm.weight", "text.ln_final.weight")
    m.move(t + "final_layer_norm.bias", "text.ln_final.bias")
    m.move("text_projection.weight", "text.text_projection.weight", _t)
    m.move("logit_scale", "logit_scale")
    m.drop(r".*position_ids")
    for tower, dst_tower in ((v, "visual"), (t, "text")):
        for i in _block_indices(m.src, tower + "encoder.layers."):
            src, dst = f"{tower}encoder.layers.{i}.", f"{dst_tower}.transformer.blocks.{i}."
            m.block(src, dst, _HF_BLOCK)
            m.fuse_qkv([src + f"self_attn.{n}_proj.weight" for n in "qkv"], dst + "attn.qkv.weight", True)
            m.fuse_qkv([src + f"self_attn.{n}_proj.bias" for n in "qkv"], dst + "attn.qkv.bias", False)
    return m.finish("HF transformers")


# ----------------------------------------------------------------------------------------------
# PaddleMIX's own Paddle checkpoints (the files it hosts as model_state*.pdparams).
#
# PaddleMIX ported open_clip / EVA-CLIP to Paddle keeping the reference module names but with
# separate q/k/v projections (``attn.q_proj`` ...) and Paddle's [in, out] linear weights, so
# nothing is transposed here; q/k/v are fused along the output axis. Its EVA towers keep the
# q/v biases on the projections instead of EVA-CLIP's ``q_bias``/``v_bias``, and bfloat16
# weights arrive as the uint16 bit patterns Paddle pickles them as.
_LEGACY_CLIP_BLOCK: List[Tuple[str, str, bool]] = [(src, dst, False) for src, dst, _ in _OPEN_CLIP_BLOCK]

_LEGACY_EVA_BLOCK: List[Tuple[str, str, bool]] = [
    (src, dst, False) for src, dst, _ in _EVA_BLOCK if not src.startswith(("attn.qkv.", "attn.q_bias", "attn.v_bias"))
] + [("attn.q_proj.bias", "attn.q_bias", False), ("attn.v_proj.bias", "attn.v_bias", False)]

_LEGACY_RESBLOCK_ATTN = re.compile(r"(^|\.)resblocks\.\d+\.attn\.(q_proj|k_proj|v_proj)\.weight$")
_LEGACY_EVA_ATTN = re.compile(r"^visual\.blocks\.\d+\.attn\.(q_proj\.bias|v_proj\.bias|qv_proj\.weight)$")
_EVA_MLP_IN = re.compile(r"^visual\.blocks\.(\d+)\.mlp\.(fc1|w1)\.weight$")


def _is_paddlemix_legacy(sd: StateDict) -> bool:
    """PaddleMIX's keys, told apart from the torch layouts they imitate.

    CLIP towers: split ``attn.q_proj`` under ``resblocks`` (open_clip packs ``in_proj_weight``).
    EVA towers: biases on the projections, or else the [in, out] orientation of the first MLP
    matrix, which is unambiguous because its two sides differ (hidden width != model width).
    """
    for key in sd:
        if _LEGACY_RESBLOCK_ATTN.search(key) or _LEGACY_EVA_ATTN.match(key):
            return True
    for key, value in sd.items():
        m = _EVA_MLP_IN.match(key)
        if m is None:
            continue
        norm = sd.get(f"visual.blocks.{m.group(1)}.norm1.weight")
        if norm is not None and value.ndim == 2 and value.shape[0] == norm.shape[0] != value.shape[1]:
            return True
    return False


def widen_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Paddle pickles bfloat16 as raw uint16 bits; no CLIP weight is an integer, so widen them."""
    return bf16_bits_to_float32(x) if x.dtype == np.uint16 else x


def _insert_k(qv: np.ndarray, k: np.ndarray) -> np.ndarray:
    """[in, q | v] and [in, k] -> [in, q | k | v]."""
    q, v = np.split(qv, 2, axis=1)
    return np.concatenate([q, k, v], axis=1)


def _legacy_attn(m: _Mapper, src: str, dst: str) -> None:
    """Fuse split q/k/v projections ([in, out] each) into one [in, 3 * out] matrix."""
    m.fuse_qkv_axis1([src + f"attn.{n}_proj.weight" for n in "qkv"], dst + "attn.qkv.weight")
    m.fuse_qkv_axis1([src + f"attn.{n}_proj.bias" for n in "qkv"], dst + "attn.qkv.bias")


def _convert_paddlemix_legacy(sd: StateDict) -> StateDict:
    m = _Mapper({k: LazyArray(widen_bf16_bits, v, shape=v.shape, dtype=np.float32) if v.dtype == np.uint16
                 else v for k, v in sd.items()})
    # CLIP vision tower (PaddleMIX VisionTransformer).
    _clip_vision_stem(m)
    for i in _block_indices(m.src, "visual.transformer.resblocks."):
        s, d = f"visual.transformer.resblocks.{i}.", f"visual.transformer.blocks.{i}."
        m.block(s, d, _LEGACY_CLIP_BLOCK)
        _legacy_attn(m, s, d)
    p = "visual.attn_pool."
    m.move(p + "query", p + "query")
    for ln in ("ln_q", "ln_k"):
        m.move(f"{p}{ln}.weight", f"{p}{ln}.weight")
        m.move(f"{p}{ln}.bias", f"{p}{ln}.bias")
    for part in ("weight", "bias"):
        m.move(f"{p}attn.q_proj.{part}", f"{p}q_proj.{part}")
        m.move(f"{p}attn.out_proj.{part}", f"{p}out_proj.{part}")
        m.fuse_qkv_axis1([f"{p}attn.k_proj.{part}", f"{p}attn.v_proj.{part}"], f"{p}kv_proj.{part}")
    # EVA vision tower (PaddleMIX EVAVisionTransformer), [in, out] head already.
    _eva_vision_stem(m, None)
    for i in _block_indices(m.src, "visual.blocks."):
        s, d = f"visual.blocks.{i}.", f"visual.transformer.blocks.{i}."
        if s + "attn.qv_proj.weight" in m.src:  # fuse_qv: q and v share one matrix, k is separate
            m.out[d + "attn.qkv.weight"] = LazyArray(
                _insert_k, m.src.pop(s + "attn.qv_proj.weight"), m.src.pop(s + "attn.k_proj.weight")
            )
            if s + "attn.qv_proj.bias" in m.src:
                m.derive(s + "attn.qv_proj.bias", {d + "attn.q_bias": _pieces(0, 1, 2), d + "attn.v_bias": _pieces(1, 2, 2)})
        m.block(s, d, _LEGACY_EVA_BLOCK)
        m.fuse_qkv_axis1([s + f"attn.{n}_proj.weight" for n in "qkv"], d + "attn.qkv.weight")
        m.fuse_qkv_axis1([s + "mlp.w1.weight", s + "mlp.w2.weight"], d + "mlp.fc1.weight")
        m.fuse_qkv_axis1([s + "mlp.w1.bias", s + "mlp.w2.bias"], d + "mlp.fc1.bias")
    # Text tower: under ``text.`` (custom_text / EVA) or flattened into the CLIP root.
    _clip_text(m, _text_prefix(m), legacy=True)
    m.move("logit_scale", "logit_scale")
    m.drop(r"attn_mask")
    return m.finish("PaddleMIX (legacy Paddle)")


_CONVERTERS = {
    "open_clip": _convert_open_clip,
    "eva": _convert_eva,
    "hf": _convert_hf,
    "paddlemix": dict,
    "paddlemix_legacy": _convert_paddlemix_legacy,
}


def convert_state_dict(sd: StateDict, layout: Optional[str] = None, *, lazy: bool = False) -> StateDict:
    """Map a reference state dict onto paddlemix names and Paddle weight orientation.

    ``lazy=True`` returns the plan: values that need computing are
    :class:`~paddlemix.zoo.formats.lazy.LazyArray` (read with ``np.asarray``), so a caller
    that streams tensors into a model holds one converted tensor at a time.
    """
    layout = layout or detect_layout(sd)
    if layout not in _CONVERTERS:
        raise ConversionError(f"unknown checkpoint layout {layout!r}; expected one of {sorted(_CONVERTERS)}")
    converted = _CONVERTERS[layout](sd)
    if lazy:
        return converted
    return {name: np.asarray(value) for name, value in converted.items()}


def convert_shards(shards: Iterable[StateDict], layout: Optional[str] = None) -> Iterator[Tuple[str, StateDict]]:
    """``(layout, lazily converted tensors)`` shard by shard.

    The layout is detected from the first shard that shows it; a shard whose names alone do
    not (a small shard holding only a stem tensor) waits to be converted with the next one,
    which costs nothing: its values are unread views of the file.
    """
    pending: StateDict = {}
    for shard in shards:
        if not shard:
            continue
        twice = pending.keys() & shard.keys()
        if twice:
            raise ConversionError(f"tensors {sorted(twice)[:10]} appear in more than one shard")
        pending.update(shard)
        if layout is None:
            try:
                layout = detect_layout(pending)
            except ConversionError:
                continue
        yield layout, convert_state_dict(pending, layout, lazy=True)
        pending = {}
    if pending:
        detect_layout(pending)  # raises: no shard told the layout


def resize_pos_embed(pos: np.ndarray, new_grid: Tuple[int, int], num_prefix_tokens: int = 1) -> np.ndarray:
    """Bicubically resample a learned ``[prefix + gh * gw, C]`` table to another grid.

    Used when an image size differs from the checkpoint's (``force_image_size``).
    Prefix (class) rows are kept as they are.
    """
    import paddle
    import paddle.nn.functional as F

    prefix, grid = pos[:num_prefix_tokens], pos[num_prefix_tokens:]
    old = int(round(np.sqrt(grid.shape[0])))
    if old * old != grid.shape[0]:
        raise ConversionError(f"position table of {grid.shape[0]} rows is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos
    img = paddle.to_tensor(grid.astype(np.float32).reshape(1, old, old, -1).transpose(0, 3, 1, 2))
    img = F.interpolate(img, size=list(new_grid), mode="bicubic", align_corners=False)
    grid = img.numpy().transpose(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)
    return np.concatenate([prefix, grid.astype(pos.dtype)], axis=0)


def hf_config_to_model_cfg(hf: dict) -> dict:
    """An HF transformers ``CLIPConfig`` dict as an open_clip-schema model config."""
    if hf.get("model_type") != "clip":
        raise ConversionError(f"expected an HF config with model_type 'clip', got {hf.get('model_type')!r}")
    vc, tc = hf.get("vision_config", {}), hf.get("text_config", {})
    acts = {vc.get("hidden_act", "quick_gelu"), tc.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ConversionError(f"unsupported HF activations {sorted(acts)}; expected quick_gelu or gelu in both towers")

    def eps_kwargs(c: dict) -> Optional[dict]:
        eps = c.get("layer_norm_eps", 1e-5)
        return None if eps == 1e-5 else {"eps": eps}

    v_width, t_width = vc.get("hidden_size", 768), tc.get("hidden_size", 512)
    v_heads, t_heads = vc.get("num_attention_heads", 12), tc.get("num_attention_heads", 8)
    eos = tc.get("eos_token_id", 2)
    text_cfg = {
        "context_length": tc.get("max_position_embeddings", 77),
        "vocab_size": tc.get("vocab_size", 49408),
        "width": t_width,
        "heads": t_heads,
        "layers": tc.get("num_hidden_layers", 12),
        "mlp_ratio": tc.get("intermediate_size", 2048) / t_width,
        "norm_kwargs": eps_kwargs(tc),
    }
    # HF's legacy configs (eos_token_id 2) pool the largest token id, like OpenAI's argmax.
    if eos == 2:
        text_cfg["pool_type"] = "argmax"
    else:
        text_cfg.update(pool_type="eos", eos_id=eos)
    return {
        "embed_dim": hf.get("projection_dim", 512),
        "quick_gelu": acts == {"quick_gelu"},
        "init_logit_scale": hf.get("logit_scale_init_value", 2.6592),
        "vision_cfg": {
            "image_size": vc.get("image_size", 224),
            "patch_size": vc.get("patch_size", 32),
            "width": v_width,
            "head_width": v_width // v_heads,
            "layers": vc.get("num_hidden_layers", 12),
            "mlp_ratio": vc.get("intermediate_size", 3072) / v_width,
            "norm_kwargs": eps_kwargs(vc),
        },
        "text_cfg": text_cfg,
    }
