"""paddlemix.kernels.dispatch: the one place that picks each layer's implementation."""

import numpy as np
import paddle
import pytest

from paddlemix.kernels import dispatch
from paddlemix.models.layers import ATTENTION_FUNCTIONS, Attention
from tiny_models import tiny_model as _tiny_model


def _x(dtype="float32"):
    return paddle.randn([2, 3, 8]).astype(dtype)


def test_eager_cpu_float32_takes_the_cpu_implementations():
    x = _x()
    assert paddle.in_dynamic_mode() and x.place.is_cpu_place()
    assert dispatch.choose("linear", x) == "addmm"
    assert dispatch.choose("linear", x, params_fp32=False) == "paddle"
    assert dispatch.choose("attention", x, grad=True) == "cpu_einsum"
    assert dispatch.choose("attention", x) == ("paddlemix" if dispatch.status().available else "cpu_einsum")
    assert dispatch.choose("attention", x, fused_attn=False) == "math"
    assert dispatch.choose("attention_core", x, core_fits=True) == "paddlemix"  # CI's Paddle bundles MKL
    assert dispatch.choose("attention_core", x) == "split_heads"  # RoPE, dropout or a per-sample mask
    assert dispatch.choose("patch_embed", x) == "matmul"
    kernels_on = dispatch.status().available
    expected = "paddlemix" if kernels_on else "paddle"
    assert dispatch.choose("gelu", x) == expected
    assert dispatch.choose("softmax", x) == expected
    assert dispatch.choose("layer_norm", x, training=True) == expected
    assert dispatch.choose("layer_norm", x, training=False) == "paddle"  # the op's forward alone is slower
    assert dispatch.choose("fused_norm", x) == "paddlemix"


def test_other_dtypes_keep_paddles_kernels():
    x = _x("float16")
    assert dispatch.choose("linear", x) == "paddle"
    assert dispatch.choose("attention", x) == "sdpa"
    assert dispatch.choose("patch_embed", x) == "conv"
    for op in ("gelu", "softmax"):
        assert dispatch.choose(op, x) == "paddle"
    assert dispatch.choose("layer_norm", x, training=True) == "paddle"
    assert dispatch.choose("fused_norm", x) == "paddlemix"  # computed in float32 inside the op
    assert dispatch.choose("fused_norm", _x("float64")) == "reference"


def test_static_graph_built_on_cpu_keeps_addmm_and_einsum_attention_only():
    paddle.enable_static()
    try:
        with paddle.static.program_guard(paddle.static.Program(), paddle.static.Program()):
            x = paddle.static.data("x", [-1, 3, 8], "float32")
            assert dispatch.choose("linear", x) == "addmm"
            assert dispatch.choose("attention", x) == "cpu_einsum"
            for op in ("gelu", "softmax", "patch_embed"):
                assert dispatch.choose(op, x) in ("paddle", "conv")
            assert dispatch.choose("layer_norm", x, training=True) == "paddle"
    finally:
        paddle.disable_static()


def test_explicit_implementation_overrides_and_bad_names_fail():
    x = _x()
    assert dispatch.choose("linear", x, impl="paddle") == "paddle"
    assert dispatch.choose("attention", x, impl="math") == "math"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dispatch.choose("attention", x, impl="flash")
    with pytest.raises(ValueError, match="unknown operation 'conv3d'"):
        dispatch.choose("conv3d", x)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        Attention(8, 2, attn_impl="flash")
    assert set(ATTENTION_FUNCTIONS) == set(dispatch.IMPLEMENTATIONS["attention"])


def test_linear_implementations_agree():
    paddle.seed(0)
    x, w, b = paddle.randn([4, 5, 8]), paddle.randn([8, 6]), paddle.randn([6])
    ref = paddle.nn.functional.linear(x, w, b).numpy()
    np.testing.assert_array_equal(dispatch.linear(x, w, b, impl="paddle").numpy(), ref)
    np.testing.assert_allclose(dispatch.linear(x, w, b).numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask", [False, True])
def test_attention_implementations_agree(mask):
    paddle.seed(0)
    x = paddle.randn([2, 5, 16])
    m = paddle.triu(paddle.full([5, 5], float("-inf")), 1) if mask else None
    outs = {}
    for impl in dispatch.IMPLEMENTATIONS["attention"]:
        paddle.seed(1)
        layer = Attention(16, 4, attn_impl=impl)
        layer.eval()
        outs[impl] = layer(x, attn_mask=m).numpy()
    np.testing.assert_allclose(outs["cpu_einsum"], outs["math"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs["sdpa"], outs["math"], rtol=1e-5, atol=1e-6)


def test_chosen_attention_is_the_registered_function_bit_for_bit():
    paddle.seed(0)
    x = paddle.randn([2, 5, 16])
    layer = Attention(16, 4)
    layer.eval()
    auto = layer(x).numpy()
    layer.attn_impl = "cpu_einsum"
    np.testing.assert_array_equal(layer(x).numpy(), auto)


def test_model_code_asks_dispatch_instead_of_testing_places():
    """Layers say what they compute; the place/mode tests and raw operator calls live in kernels.dispatch."""
    from pathlib import Path

    import paddlemix.models

    forbidden = ("is_cpu_place", "is_gpu_place", "_current_expected_place_", "_run_custom_op", "is_compiled_with_cuda",
                 "has_op", "status()")
    offenders = [
        f"{path.name}: {word}"
        for path in Path(paddlemix.models.__file__).parent.rglob("*.py")
        for word in forbidden
        if word in path.read_text(encoding="utf-8")
    ]
    assert not offenders, offenders


def test_linear_gelu_adds_the_bias_in_the_gelu_pass_with_the_same_bits():
    assert dispatch.status().available  # CI builds the library
    x = _x()
    assert dispatch.choose("linear_gelu", x) == "paddlemix"
    assert dispatch.choose("linear_gelu", x, grad=True) == "separate"
    assert dispatch.choose("linear_gelu", x, params_fp32=False) == "separate"
    assert dispatch.choose("linear_gelu", _x("float16")) == "separate"
    rng = np.random.default_rng(7)
    x = paddle.to_tensor(rng.standard_normal([3, 5, 24]).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal([24, 37]).astype("float32"))  # 37: vector lanes and a scalar tail
    b = paddle.to_tensor(rng.standard_normal([37]).astype("float32"))
    with paddle.no_grad():
        fused = dispatch.linear_gelu(x, w, b)
        separate = dispatch.linear_gelu(x, w, b, impl="separate")
        reference = dispatch.gelu(dispatch.linear(x, w, b))
    assert fused.shape == [3, 5, 37]
    np.testing.assert_array_equal(fused.numpy(), separate.numpy())
    np.testing.assert_array_equal(fused.numpy(), reference.numpy())


def test_linear_gelu_with_a_gradient_takes_the_separate_path():
    rng = np.random.default_rng(8)
    x = paddle.to_tensor(rng.standard_normal([4, 16]).astype("float32"), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal([16, 8]).astype("float32"))
    b = paddle.to_tensor(rng.standard_normal([8]).astype("float32"))
    y = dispatch.linear_gelu(x, w, b)  # grad enabled and x needs one: the operator has no backward
    (gx,) = paddle.grad([y.sum()], [x])
    ref_x = paddle.to_tensor(x.numpy(), stop_gradient=False)
    (want,) = paddle.grad([paddle.nn.functional.gelu(paddle.nn.functional.linear(ref_x, w, b)).sum()], [ref_x])
    np.testing.assert_allclose(gx.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no gradient"):
        dispatch.linear_gelu(x, w, b, impl="paddlemix")


def test_linear_residual_adds_bias_and_residual_in_one_pass_with_the_same_bits():
    assert dispatch.status().available
    x = _x()
    assert dispatch.choose("linear_residual", x) == "paddlemix"
    assert dispatch.choose("linear_residual", x, grad=True) == "separate"
    assert dispatch.choose("linear_residual", _x("float16")) == "separate"
    rng = np.random.default_rng(9)
    x = paddle.to_tensor(rng.standard_normal([3, 5, 24]).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal([24, 37]).astype("float32"))
    b = paddle.to_tensor(rng.standard_normal([37]).astype("float32"))
    r = paddle.to_tensor(rng.standard_normal([3, 5, 37]).astype("float32"))
    with paddle.no_grad():
        fused = dispatch.linear_residual(x, w, b, r)
        separate = dispatch.linear_residual(x, w, b, r, impl="separate")
        reference = r + paddle.nn.functional.linear(x, w, b)
    assert fused.shape == [3, 5, 37]
    np.testing.assert_array_equal(fused.numpy(), separate.numpy())
    np.testing.assert_array_equal(fused.numpy(), reference.numpy())


def test_linear_residual_with_a_gradient_takes_the_separate_path():
    rng = np.random.default_rng(10)
    x = paddle.to_tensor(rng.standard_normal([4, 16]).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal([16, 8]).astype("float32"))
    b = paddle.to_tensor(rng.standard_normal([8]).astype("float32"))
    r = paddle.to_tensor(rng.standard_normal([4, 8]).astype("float32"), stop_gradient=False)
    y = dispatch.linear_residual(x, w, b, r)  # only the residual needs a gradient: still no fused operator
    (gr,) = paddle.grad([(y * y).sum()], [r])
    np.testing.assert_allclose(gr.numpy(), 2 * y.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="no gradient"):
        dispatch.linear_residual(x, w, b, r, impl="paddlemix")


@pytest.mark.parametrize("B,L,H,D", [(2, 7, 3, 12), (3, 50, 4, 16), (1, 77, 2, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_attention_core_operator_gives_the_bits_of_the_separate_steps(B, L, H, D, with_bias, with_mask):
    from paddlemix.models.layers import cpu_einsum_attention

    assert dispatch.has_op("cpu_attention")  # CI's Paddle bundles MKL
    rng = np.random.default_rng(B * L + H)
    qkv = paddle.to_tensor(rng.standard_normal([B, L, 3, H, D]).astype("float32"))
    bias = paddle.to_tensor(rng.standard_normal([3 * H * D]).astype("float32")) if with_bias else None
    mask = paddle.triu(paddle.full([L, L], float("-inf")), 1) if with_mask else None
    scale = D**-0.5
    with paddle.no_grad():
        fused = dispatch.run_cpu_attention(qkv, bias, mask, scale)
        biased = qkv if bias is None else qkv + bias.reshape([3, H, D])
        separate = cpu_einsum_attention(biased, mask, None, None, 1, scale, 0.0, False)
    assert fused.shape == [B, L, H, D]
    np.testing.assert_array_equal(fused.numpy(), separate.numpy())


def test_attention_core_runs_for_clip_blocks_and_padding_masks_keep_the_separate_steps(tmp_path, monkeypatch):
    from paddlemix.models.layers import cpu_split_attention

    model, images, texts = _tiny_model("clip", tmp_path, head_width=16)
    calls = []
    fused_op = dispatch.run_cpu_attention
    monkeypatch.setattr(dispatch, "run_cpu_attention", lambda *a: calls.append(1) or fused_op(*a))
    with paddle.no_grad():
        model.encode_image(images)
        model.encode_text(texts)  # the causal [L, L] mask
        assert len(calls) == 4  # 2 blocks per tower
        qkv = paddle.randn([2, 5, 3, 2, 8])
        pad = paddle.zeros([2, 1, 1, 5])  # a per-sample key mask: not one [L, L] matrix
        cpu_split_attention(qkv, pad, None, None, 1, 0.25, 0.0, False)
        dropped = cpu_split_attention(qkv, None, None, None, 1, 0.25, 0.5, True)  # recompute's no-grad pass
        assert len(calls) == 4  # attention dropout keeps the separate steps, which apply it
        # A library built without it (no bundled MKL): the head split operator, the same bits.
        fused = cpu_split_attention(qkv, None, None, None, 1, 0.25, 0.0, False)
        monkeypatch.setattr(dispatch, "has_op", lambda name: name != "cpu_attention")
        split = cpu_split_attention(qkv, None, None, None, 1, 0.25, 0.0, False)
    assert len(calls) == 5
    np.testing.assert_array_equal(fused.numpy(), split.numpy())
    assert not np.array_equal(dropped.numpy(), fused.numpy())


def _set_attention(model, impl):
    for layer in model.sublayers():
        if isinstance(layer, Attention):
            layer.attn_impl = impl


@pytest.mark.parametrize("name", ["clip", "eva02"])
def test_split_heads_attention_is_bit_identical_to_the_einsum_one(name, tmp_path):
    """Inference through the library's cpu_split_heads gives the bits of cpu_einsum: a CLIP model
    with a causal text mask and a head width whose scale is not a power of two, and an EVA02 model
    with RoPE (q scaled after its rotation)."""
    assert dispatch.status().available
    model, images, texts = _tiny_model(name, tmp_path, head_width=12)
    with paddle.no_grad():
        assert dispatch.choose("attention", paddle.randn([2, 3, 8])) == "paddlemix"
        auto = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
        _set_attention(model, "cpu_einsum")
        einsum = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
    for a, b in zip(auto, einsum):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["clip", "eva02"])
def test_blocks_handing_the_skip_add_to_the_last_linear_give_the_same_bits(name, tmp_path, monkeypatch):
    """A pre-norm block without layer scale adds its skip connection in the branch's last linear
    layer (linear_residual); the model's outputs are those of ``x + branch(x)``, bit for bit."""
    from paddlemix.models.transformer import Block

    model, images, texts = _tiny_model(name, tmp_path, head_width=16)
    blocks = [layer for layer in model.sublayers() if isinstance(layer, Block)]
    assert blocks and all(block.plain_residual for block in blocks)
    calls = []
    fused_op = dispatch.run_cpu_bias_residual
    monkeypatch.setattr(dispatch, "run_cpu_bias_residual", lambda *a: calls.append(1) or fused_op(*a))
    with paddle.no_grad():
        handed = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
        assert len(calls) == 2 * len(blocks)  # the attention and the MLP branch of every block of both towers
        monkeypatch.setattr(Block, "plain_residual", property(lambda self: False))
        added = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
    for a, b in zip(handed, added):
        np.testing.assert_array_equal(a, b)


def test_a_drop_path_put_into_a_block_after_construction_is_applied(tmp_path):
    """plain_residual follows the block's current sub-layers: a fine-tuning script that sets a drop
    path later gets it applied, not skipped by the fused skip connection."""
    from paddlemix.models.layers import DropPath
    from paddlemix.models.transformer import Block

    model, images, _ = _tiny_model("clip", tmp_path, head_width=16)
    block = next(layer for layer in model.sublayers() if isinstance(layer, Block))
    assert block.plain_residual
    block.drop_path = DropPath(0.5)
    assert not block.plain_residual
    x = paddle.randn([2, 5, 64])
    block.train()
    paddle.seed(1)
    with paddle.no_grad():
        dropped = block(x).numpy()
    block.eval()
    with paddle.no_grad():
        kept = block(x).numpy()
    assert not np.allclose(dropped, kept)  # whole samples of each branch dropped (and the rest rescaled)
