"""paddlemix.inference_mode and the packed-weight GEMM it turns on (the library's
``cpu_gemm_pack`` / ``cpu_packed_gemm``, built where Paddle bundles MKL, as its x86 wheels do)."""
import copy
import pickle

import numpy as np
import paddle
import pytest

import paddlemix
from paddlemix.kernels import build_config, dispatch
from paddlemix.models.layers import Linear
from tiny_models import tiny_model


@pytest.fixture(autouse=True)
def _library_loaded():
    """The library loads at its first use through the dispatch; these tests also call its operators directly."""
    assert dispatch.has_op("cpu_packed_gemm")  # CI's Paddle wheel is the x86 one, which bundles MKL


def _linears(model):
    return [layer for layer in model.sublayers() if type(layer) is Linear]


def test_the_packed_gemm_operators_are_built_where_paddle_bundles_mkl():
    assert dispatch.has_op("cpu_packed_gemm") == dispatch.has_op("cpu_gemm_pack") == build_config.has_cblas()


@pytest.mark.parametrize("rows,k,n", [(1, 64, 192), (5, 64, 64), (50, 256, 64), (130, 64, 256)])
def test_packed_gemm_computes_the_linear_layer(rows, k, n):
    rng = np.random.default_rng(rows + k + n)
    x = paddle.to_tensor(rng.standard_normal([rows, k]).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal([k, n]).astype("float32"))
    b = paddle.to_tensor(rng.standard_normal([n]).astype("float32"))
    with paddle.no_grad():
        packed = dispatch._run_custom_op("cpu_gemm_pack", w, rows)[0]
        with_bias = dispatch._run_custom_op("cpu_packed_gemm", x, packed, b, k, n, True)[0]
        without = dispatch._run_custom_op("cpu_packed_gemm", x, packed, paddle.empty([0]), k, n, False)[0]
        # A pack laid out for another row count still gives the product.
        other = dispatch._run_custom_op("cpu_gemm_pack", w, rows + 7)[0]
        other_rows = dispatch._run_custom_op("cpu_packed_gemm", x, other, b, k, n, True)[0]
    expected = x.numpy().astype(np.float64) @ w.numpy().astype(np.float64)
    assert with_bias.shape == without.shape == [rows, n]
    np.testing.assert_allclose(without.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(with_bias.numpy(), expected + b.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(other_rows.numpy(), with_bias.numpy(), rtol=1e-5, atol=1e-5)


def test_packed_gemm_checks_its_operands():
    w = paddle.randn([8, 4])
    with paddle.no_grad():
        packed = dispatch._run_custom_op("cpu_gemm_pack", w, 3)[0]
        empty = dispatch._run_custom_op("cpu_packed_gemm", paddle.zeros([0, 8]), packed, paddle.empty([0]), 8, 4,
                                        False)[0]
        assert empty.shape == [0, 4]
        with pytest.raises(Exception, match=r"x must be \[M, 8\]"):
            dispatch._run_custom_op("cpu_packed_gemm", paddle.randn([3, 5]), packed, paddle.empty([0]), 8, 4, False)
        with pytest.raises(Exception, match="bias has 3 values"):
            dispatch._run_custom_op("cpu_packed_gemm", paddle.randn([3, 8]), packed, paddle.zeros([3]), 8, 4, True)
        with pytest.raises(Exception, match="smaller than a"):  # a pack of a smaller weight
            dispatch._run_custom_op("cpu_packed_gemm", paddle.randn([3, 4096]), packed, paddle.empty([0]), 4096, 4096,
                                    False)
        with pytest.raises(Exception, match=r"weight must be \[K, N\]"):
            dispatch._run_custom_op("cpu_gemm_pack", paddle.randn([2, 3, 4]), 3)


def test_choose_packs_only_float32_cpu_inference_with_a_pack():
    x = paddle.randn([4, 8])
    assert dispatch.choose("gemm", x, packed=True) == "packed"
    assert dispatch.choose("gemm", x) == "paddle"  # the layer holds no pack (outside inference_mode)
    assert dispatch.choose("gemm", x, packed=True, grad=True) == "paddle"
    assert dispatch.choose("gemm", x, packed=True, params_fp32=False) == "paddle"
    assert dispatch.choose("gemm", x.astype("float16"), packed=True) == "paddle"


def test_a_weight_is_packed_on_its_second_call_and_repacked_when_seen_to_change():
    holder = dispatch.PackedWeight()
    w = paddle.randn([8, 4])
    with paddle.no_grad():
        assert holder.packed(w, 3) is None  # one call alone costs no packing
        first = holder.packed(w, 3)
        assert first is not None and holder.packed(w, 3) is first
        assert holder.packed(w, 5) is None  # another row count: the pack is laid out per count
        assert holder.packed(w, 5) is not None
        paddle.assign(paddle.ones([8, 4]), output=w)  # an in-place Paddle op moves the tensor's version
        assert holder.packed(w, 5) is None and holder.packed(w, 5) is not None
        assert holder.packed(paddle.randn([8, 4]), 5) is None  # another tensor
        holder.packed(w, 5)
        assert holder.packed(w, 5) is not None
        for copied in (copy.copy(holder), copy.deepcopy(holder), pickle.loads(pickle.dumps(holder))):
            assert copied.packed(w, 5) is None  # a copy starts empty: a pack is valid only where it was written


@pytest.mark.parametrize("name", ["clip", "eva02"])
def test_inference_mode_gives_the_no_grad_numbers_and_frees_its_packs(name, tmp_path, monkeypatch):
    model, images, texts = tiny_model(name, tmp_path, head_width=16)
    with paddle.no_grad():
        expected = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
    products = []
    op = dispatch._run_custom_op
    monkeypatch.setattr(dispatch, "_run_custom_op", lambda n, *a: products.append(n) or op(n, *a))
    with paddlemix.inference_mode(model) as held:
        assert held is model and not paddle.is_grad_enabled()
        assert all(isinstance(layer.packed, dispatch.PackedWeight) for layer in _linears(model))
        once = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
        assert "cpu_packed_gemm" not in products  # a single call runs the unpacked GEMM
        for _ in range(2):
            again = [model.encode_image(images).numpy(), model.encode_text(texts).numpy()]
    assert paddle.is_grad_enabled()
    assert all(layer.packed is None for layer in _linears(model))
    # qkv, proj, fc1 and fc2 of each of the 2 blocks of both towers, on the last call
    assert products.count("cpu_packed_gemm") >= 2 * 2 * 4
    for a, b, c in zip(expected, once, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)


def test_inference_mode_sees_an_in_place_weight_change_and_allows_an_explicit_gradient(tmp_path):
    model, images, _ = tiny_model("clip", tmp_path, head_width=16)
    fc = next(layer for layer in _linears(model.visual))
    with paddlemix.inference_mode(model):
        for _ in range(2):
            model.encode_image(images)
        paddle.assign(fc.weight * 0.5, output=fc.weight)
        for _ in range(2):  # the second call repacks the changed weight and uses it
            changed = model.encode_image(images).numpy()
        with paddle.enable_grad():  # a gradient inside the block takes Paddle's GEMM
            loss = model.encode_image(images).sum()
            loss.backward()
    assert fc.weight.grad is not None
    with paddle.no_grad():
        np.testing.assert_allclose(changed, model.encode_image(images).numpy(), rtol=1e-5, atol=1e-6)


def test_nested_blocks_keep_the_outer_packs_and_bad_arguments_fail(tmp_path):
    model, images, _ = tiny_model("clip", tmp_path, head_width=16)
    with paddlemix.inference_mode(model):
        outer = [layer.packed for layer in _linears(model)]
        with paddlemix.inference_mode(model.visual):
            assert [layer.packed for layer in _linears(model)] == outer
        assert [layer.packed for layer in _linears(model)] == outer
    with pytest.raises(TypeError, match="paddle.nn.Layer"):
        with paddlemix.inference_mode(lambda x: x):
            pass
