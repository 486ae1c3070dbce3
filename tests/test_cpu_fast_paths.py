"""The CPU eager fast paths compute what the plain Paddle ops compute, gradients included."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlemix import kernels
from paddlemix.models.layers import Attention, LayerNorm, Linear


def _grads(out, inputs, dy):
    return [None if g is None else g.numpy() for g in paddle.grad([out], inputs, [dy], allow_unused=True)]


@pytest.mark.parametrize("frozen", ["none", "weight", "bias", "input"])
def test_linear_backward_equals_f_linear(frozen):
    rng = np.random.default_rng(0)
    layer = Linear(24, 40)
    x = paddle.to_tensor(rng.standard_normal([3, 5, 24]).astype("float32"), stop_gradient=False)
    dy = paddle.to_tensor(rng.standard_normal([3, 5, 40]).astype("float32"))
    if frozen == "input":
        x.stop_gradient = True
    elif frozen != "none":
        getattr(layer, frozen).stop_gradient = True
    trainable = [t for t in (x, layer.weight, layer.bias) if not t.stop_gradient]
    fast = layer(x)
    ref = F.linear(x, layer.weight, layer.bias)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    for got, want in zip(_grads(fast, trainable, dy), _grads(ref, trainable, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if frozen in ("weight", "bias"):
        loss = (layer(x) * dy).sum()
        loss.backward()
        assert getattr(layer, frozen).grad is None


def test_linear_without_grad_is_plain_addmm():
    layer = Linear(8, 4)
    x = paddle.randn([2, 8])
    with paddle.no_grad():
        y = layer(x)
    assert y.stop_gradient
    np.testing.assert_allclose(y.numpy(), F.linear(x, layer.weight, layer.bias).numpy(), rtol=1e-6, atol=1e-6)


def test_layer_norm_in_training_mode_matches_reference():
    assert kernels.status().available  # CI builds it; the fallback is Paddle's own kernel
    rng = np.random.default_rng(1)
    ln = LayerNorm(96)
    ln.weight.set_value(paddle.to_tensor(rng.uniform(0.5, 1.5, 96).astype("float32")))
    ln.bias.set_value(paddle.to_tensor(rng.standard_normal(96).astype("float32")))
    x = paddle.to_tensor(3 * rng.standard_normal([4, 7, 96]).astype("float32") + 1, stop_gradient=False)
    dy = paddle.to_tensor(rng.standard_normal([4, 7, 96]).astype("float32"))
    ln.train()
    fast = ln(x)
    ref = F.layer_norm(x, [96], ln.weight, ln.bias, 1e-5)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-5)
    params = [x, ln.weight, ln.bias]
    for got, want in zip(_grads(fast, params, dy), _grads(ref, params, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    ln.eval()  # evaluation keeps Paddle's kernel: bit-identical to F.layer_norm
    np.testing.assert_array_equal(ln(x).numpy(), ref.numpy())


def test_qv_bias_projection_gradients():
    """EVA's q/v-bias qkv projection (bias folded into the GEMM) against matmul + bias add."""
    paddle.seed(0)
    attn = Attention(32, 4, qkv_bias="qv")
    rng = np.random.default_rng(2)
    for bias in (attn.q_bias, attn.v_bias):
        bias.set_value(paddle.to_tensor(rng.standard_normal(32).astype("float32")))
    x = paddle.to_tensor(rng.standard_normal([2, 6, 32]).astype("float32"), stop_gradient=False)
    dy = paddle.to_tensor(rng.standard_normal([2, 6, 96]).astype("float32"))
    fast = attn._qkv(x)
    full_bias = paddle.concat([attn.q_bias, paddle.zeros([32]), attn.v_bias])
    ref = paddle.matmul(x, attn.qkv.weight) + full_bias
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    params = [x, attn.qkv.weight, attn.q_bias, attn.v_bias]
    for got, want in zip(_grads(fast, params, dy), _grads(ref, params, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gelu_kernel_matches_erf_gelu_and_its_gradient():
    import math

    from paddlemix.models.layers import GELU

    rng = np.random.default_rng(3)
    values = np.concatenate([3 * rng.standard_normal(4093), np.linspace(-12, 12, 97), [0.0, -0.0, 1e-30]])
    x = paddle.to_tensor(values.astype("float32").reshape([-1, 7]), stop_gradient=False)  # 8-lane tails too
    dy = paddle.to_tensor(rng.standard_normal(x.shape).astype("float32"))
    fast, ref = GELU()(x), F.gelu(x)
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=2e-6, atol=1e-6)
    # Against float64 erf: relative accuracy holds in the negative tail too (Paddle's own
    # 1 + erf(x / sqrt 2) loses it there, so the comparison above needs its atol).
    xs = x.numpy().astype(np.float64).ravel()
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2.0)) for v in xs])
    keep = np.abs(exact) > 1e-30
    assert np.max(np.abs(fast.numpy().ravel()[keep] - exact[keep]) / np.abs(exact[keep])) < 1e-5
    np.testing.assert_allclose(_grads(fast, [x], dy)[0], _grads(ref, [x], dy)[0], rtol=2e-6, atol=2e-6)


def test_gelu_kernel_lanes_equal_its_scalar_tail():
    """Each element gets the same bits whether a vector lane (AVX2 or AVX-512) or the scalar
    tail computes it: shifting the input by one element moves every value to another lane."""
    from paddlemix.kernels import dispatch

    rng = np.random.default_rng(5)
    values = np.concatenate([4 * rng.standard_normal(1000), np.linspace(-20, 20, 123)]).astype("float32")
    with paddle.no_grad():
        ys = [dispatch.gelu(paddle.to_tensor(values[k:])).numpy() for k in range(17)]
        for k in range(1, 17):
            np.testing.assert_array_equal(ys[k], ys[0][k:])
        one = [dispatch.gelu(paddle.to_tensor(values[i : i + 1])).numpy()[0] for i in range(0, len(values), 37)]
    np.testing.assert_array_equal(np.array(one), ys[0][::37])


def test_softmax_kernel_matches_paddle_with_masks_and_gradients():
    from paddlemix.models.layers import softmax_last_axis

    rng = np.random.default_rng(4)
    for cols in (1, 7, 8, 50, 77, 197):
        x = paddle.to_tensor((4 * rng.standard_normal([3, 2, 5, cols])).astype("float32"), stop_gradient=False)
        mask = paddle.to_tensor(np.where(rng.random([5, cols]) < 0.3, -np.inf, 0.0).astype("float32"))
        mask[:, 0] = 0.0  # every row keeps one token, as a causal mask does
        dy = paddle.to_tensor(rng.standard_normal([3, 2, 5, cols]).astype("float32"))
        for inp in (x, x + mask):
            fast, ref = softmax_last_axis(inp), F.softmax(inp, axis=-1)
            np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)
            # Masked entries are exactly 0, as in exact arithmetic and torch (Paddle's CPU kernel
            # clamps its inputs and returns ~8e-29 there).
            assert (fast.numpy()[np.isneginf(inp.numpy())] == 0).all()
            np.testing.assert_allclose(_grads(fast, [x], dy)[0], _grads(ref, [x], dy)[0], rtol=1e-5, atol=1e-6)
    strided = paddle.to_tensor(rng.standard_normal([4, 6]).astype("float32")).T  # a non-contiguous view
    np.testing.assert_allclose(softmax_last_axis(strided).numpy(), F.softmax(strided, axis=-1).numpy(), atol=1e-7)
