"""The fused_ln custom operator (paddlemix/kernels/) and the layers built on it.

The library is built ahead once per machine (cached by source hash, see
paddlemix.kernels) by the session fixture in conftest.py, as `make install` does;
every comparison is against Paddle's own layer_norm or the RMSNorm math of
paddlemix.models.layers.
"""
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlemix import kernels
from paddlemix.kernels import KernelStatus, ops
from paddlemix.kernels.ops import KernelUnavailableError
from paddlemix.models.fused_norm import (
    FusedLayerNorm,
    FusedRMSNorm,
    fused_add_layer_norm,
    fused_add_rms_norm,
    fused_norm_layer,
)
from paddlemix.models.layers import LayerNorm, RMSNorm, get_norm_layer

REPO = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="session")
def op_ready():
    """Loads the library that conftest.py built ahead for the session; CI must be able to build it."""
    status = kernels.status()
    assert status.available, f"fused_ln operator not loaded: {status.detail}"
    return status


@pytest.fixture
def op_unavailable(monkeypatch):
    """The operator as seen by a process where it failed to load."""
    monkeypatch.setattr(kernels, "_status", KernelStatus(False, "", "disabled by test"))
    monkeypatch.setattr(kernels, "_warned", False)


def _tensor(rng, shape, scale=1.0, shift=0.0, dtype="float32"):
    t = paddle.to_tensor((rng.standard_normal(shape) * scale + shift).astype("float32")).astype(dtype)
    t.stop_gradient = False
    return t


def _grads(outputs, inputs, upstream):
    """paddle.grad over the outputs that have an upstream gradient; None entries skipped."""
    pairs = [(o, g) for o, g in zip(outputs, upstream) if g is not None]
    return paddle.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def _assert_close(got, want, **tol):
    np.testing.assert_allclose(got.astype("float32").numpy(), want.astype("float32").numpy(), **(tol or TOL))


def _case(rng, rows, cols):
    x = _tensor(rng, [rows, cols], 1.5, 0.3)
    r = _tensor(rng, [rows, cols])
    w = _tensor(rng, [cols], 0.5, 1.0)
    b = _tensor(rng, [cols], 0.5)
    return x, r, w, b


@pytest.mark.parametrize("cols", [1, 7, 768, 1408, 5120])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_forward_backward_match_paddle(op_ready, cols, with_residual):
    rng = np.random.default_rng(cols)
    x, r, w, b = _case(rng, 33, cols)
    dy, ds = _tensor(rng, [33, cols]), _tensor(rng, [33, cols])
    if with_residual:
        y, s, mean, rstd = ops.fused_ln(x, r, w, b, 1e-5, False)
        s_ref = x + r
        inputs, upstream = [x, r, w, b], [dy, ds]
        _assert_close(s, s_ref, rtol=0, atol=0)
    else:
        y, s, mean, rstd = ops.fused_ln(x, None, w, b, 1e-5, False)
        s_ref = x
        inputs, upstream = [x, w, b], [dy, None]
        assert s.shape == [0]
    y_ref = F.layer_norm(s_ref, [cols], w, b, 1e-5)
    _assert_close(y, y_ref)
    _assert_close(mean, s_ref.mean(-1))
    _assert_close(rstd, paddle.rsqrt(s_ref.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=1e-4)
    for got, want in zip(_grads([y, s], inputs, upstream), _grads([y_ref, s_ref], inputs, upstream)):
        _assert_close(got, want)


def test_layer_norm_constant_and_zero_rows(op_ready):
    """Zero variance: y must be exactly the bias, gradients finite and equal to Paddle's."""
    rng = np.random.default_rng(0)
    cols = 768
    rows = np.stack([np.zeros(cols), np.full(cols, 3.25), np.full(cols, -1e3), rng.standard_normal(cols)])
    x = paddle.to_tensor(rows.astype("float32"), stop_gradient=False)
    w, b = _tensor(rng, [cols], 0.5, 1.0), _tensor(rng, [cols], 0.5)
    dy = _tensor(rng, [4, cols])
    y = ops.fused_ln(x, None, w, b, 1e-5, False)[0]
    y_ref = F.layer_norm(x, [cols], w, b, 1e-5)
    np.testing.assert_array_equal(y[:3].numpy(), np.broadcast_to(b.numpy(), (3, cols)))
    _assert_close(y, y_ref)
    for got, want in zip(paddle.grad([y], [x, w, b], [dy]), paddle.grad([y_ref], [x, w, b], [dy])):
        assert np.isfinite(got.numpy()).all()
        _assert_close(got, want)


@pytest.mark.parametrize("cols", [1, 7, 768, 5120])
def test_rms_norm_matches_layers_rmsnorm(op_ready, cols):
    rng = np.random.default_rng(100 + cols)
    x, r, w, _ = _case(rng, 17, cols)
    dy, ds = _tensor(rng, [17, cols]), _tensor(rng, [17, cols])
    fused, ref = FusedRMSNorm(cols, require_op=True), RMSNorm(cols)
    fused.weight.set_value(w.detach())
    ref.weight.set_value(w.detach())
    y, y_ref = fused(x), ref(x)
    _assert_close(y, y_ref)
    for got, want in zip(paddle.grad([y], [x, fused.weight], [dy]), paddle.grad([y_ref], [x, ref.weight], [dy])):
        _assert_close(got, want)
    # With a residual, through the functional form.
    y, s = fused_add_rms_norm(x, r, w, 1e-6, require_op=True)
    s_ref = x + r
    y_ref = ref(s_ref)
    _assert_close(y, y_ref)
    inputs = [x, r, w]
    got = paddle.grad([y, s], inputs, [dy, ds])
    want = paddle.grad([y_ref, s_ref], [x, r, ref.weight], [dy, ds])
    for g, e in zip(got, want):
        _assert_close(g, e)


def test_backward_with_gradient_on_one_output_only(op_ready):
    """Only y or only the summed residual feeding the loss: the unused output contributes nothing."""
    rng = np.random.default_rng(5)
    x, r, w, b = _case(rng, 9, 64)
    dy, ds = _tensor(rng, [9, 64]), _tensor(rng, [9, 64])
    y, s, _, _ = ops.fused_ln(x, r, w, b, 1e-5, False)
    s_ref = x + r
    y_ref = F.layer_norm(s_ref, [64], w, b, 1e-5)
    for got, want in zip(paddle.grad([s], [x, r], [ds], retain_graph=True), [ds, ds]):
        _assert_close(got, want, rtol=0, atol=0)
    got = paddle.grad([y], [x, r, w, b], [dy])
    want = paddle.grad([y_ref], [x, r, w, b], [dy])
    for g, e in zip(got, want):
        _assert_close(g, e)


def test_portable_kernels_match_avx2_kernels(op_ready):
    """The non-AVX2 row kernels (used on other CPUs) compute the same values."""
    rng = np.random.default_rng(7)
    x, r, w, b = _case(rng, 21, 1411)  # not a multiple of the 32-float unroll: exercises every tail loop
    dy, ds = _tensor(rng, [21, 1411]), _tensor(rng, [21, 1411])
    results = []
    for portable in (False, True):
        for rms in (False, True):
            y, s, mean, rstd = ops.fused_ln(x, r, w, b, 1e-5, rms, portable)
            results.append([y, mean, rstd] + list(paddle.grad([y, s], [x, r, w, b], [dy, ds])))
    for fast, slow in zip(results[:2], results[2:]):
        for a, e in zip(fast, slow):
            _assert_close(a, e, rtol=1e-5, atol=2e-6)


def test_finite_difference_gradients(op_ready):
    """Central differences of L = sum(y * cy) + sum(s * cs) in fp32 on a tiny, well-conditioned case."""
    rng = np.random.default_rng(11)
    rows, cols, h = 3, 5, 1e-2
    arrays = {
        "x": rng.standard_normal((rows, cols)),
        "r": rng.standard_normal((rows, cols)),
        "w": 1 + 0.5 * rng.standard_normal(cols),
        "b": 0.5 * rng.standard_normal(cols),
    }
    cy, cs = rng.standard_normal((rows, cols)), rng.standard_normal((rows, cols))

    def loss(vals, rms):
        t = {k: paddle.to_tensor(v.astype("float32"), stop_gradient=False) for k, v in vals.items()}
        y, s, _, _ = ops.fused_ln(t["x"], t["r"], t["w"], None if rms else t["b"], 1e-5, rms)
        value = (y * paddle.to_tensor(cy, dtype="float32")).sum() + (s * paddle.to_tensor(cs, dtype="float32")).sum()
        return value, t

    for rms in (False, True):
        value, t = loss(arrays, rms)
        names = ["x", "r", "w"] + ([] if rms else ["b"])
        analytic = dict(zip(names, paddle.grad([value], [t[n] for n in names])))
        for name in names:
            numeric = np.zeros_like(arrays[name])
            for idx in np.ndindex(arrays[name].shape):
                plus = {k: v.copy() for k, v in arrays.items()}
                minus = {k: v.copy() for k, v in arrays.items()}
                plus[name][idx] += h
                minus[name][idx] -= h
                numeric[idx] = (float(loss(plus, rms)[0]) - float(loss(minus, rms)[0])) / (2 * h)
            np.testing.assert_allclose(analytic[name].numpy(), numeric, rtol=2e-3, atol=2e-3, err_msg=name)


def test_layers_share_state_dicts_with_reference_layers(op_ready):
    for fused_cls, ref_cls in ((FusedLayerNorm, LayerNorm), (FusedRMSNorm, RMSNorm)):
        fused, ref = fused_cls(48, require_op=True), ref_cls(48)
        assert sorted(fused.state_dict()) == sorted(ref.state_dict())
        rng = np.random.default_rng(3)
        ref.set_state_dict({k: paddle.to_tensor(rng.standard_normal(v.shape).astype("float32"))
                            for k, v in ref.state_dict().items()})
        fused.set_state_dict(ref.state_dict())
        x = _tensor(rng, [2, 5, 48])
        _assert_close(fused(x), ref(x))
        assert fused.use_op


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_on_cpu_computes_in_fp32(op_ready, dtype):
    rng = np.random.default_rng(9)
    x = _tensor(rng, [6, 7, 96], dtype=dtype)
    fused, ref = FusedLayerNorm(96, require_op=True), LayerNorm(96)
    y, y_ref = fused(x), ref(x)
    assert y.dtype == x.dtype
    # Both round one fp32 result to half; allow one half-precision ulp for fp32 ties.
    _assert_close(y, y_ref, rtol=1e-2 if dtype == "bfloat16" else 1e-3, atol=1e-2 if dtype == "bfloat16" else 1e-3)
    dy = _tensor(rng, [6, 7, 96], dtype=dtype)
    (gx,), (gx_ref,) = paddle.grad([y], [x], [dy]), paddle.grad([y_ref], [x], [dy])
    assert gx.dtype == x.dtype
    _assert_close(gx, gx_ref, rtol=2e-2 if dtype == "bfloat16" else 2e-3, atol=2e-2 if dtype == "bfloat16" else 2e-3)


def test_functional_fused_add_layer_norm(op_ready):
    rng = np.random.default_rng(21)
    x, r, w, b = _case(rng, 10, 40)
    y, s = fused_add_layer_norm(x, r, w, b, 1e-5, require_op=True)
    _assert_close(s, x + r, rtol=0, atol=0)
    _assert_close(y, F.layer_norm(x + r, [40], w, b, 1e-5))


def test_op_rejects_bad_arguments_by_name(op_ready):
    x = paddle.randn([4, 8])
    with pytest.raises(Exception, match="weight must have 8 elements"):
        ops.fused_ln(x, None, paddle.ones([7]), None, 1e-5, False)
    with pytest.raises(Exception, match="residual must have the shape of x"):
        ops.fused_ln(x, paddle.randn([4, 7]), None, None, 1e-5, False)


def test_fallback_warns_once_and_matches_exactly(op_unavailable, caplog):
    rng = np.random.default_rng(4)
    x, r, w, b = _case(rng, 5, 24)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        ln, rms = FusedLayerNorm(24), FusedRMSNorm(24)
        y_ln, y_rms = ln(x), rms(x)
        y_add, s_add = fused_add_layer_norm(x, r, w, b, 1e-5)
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "disabled by test" in warnings[0].getMessage()
    assert kernels.BUILD_COMMAND in warnings[0].getMessage()
    assert not ln.use_op and not rms.use_op
    np.testing.assert_array_equal(y_ln.numpy(), LayerNorm(24)(x).numpy())
    np.testing.assert_array_equal(y_rms.numpy(), RMSNorm(24)(x).numpy())
    np.testing.assert_array_equal(s_add.numpy(), (x + r).numpy())
    np.testing.assert_array_equal(y_add.numpy(), F.layer_norm(x + r, [24], w, b, 1e-5).numpy())


def test_require_op_raises_with_reason(op_unavailable):
    with pytest.raises(KernelUnavailableError, match="disabled by test"):
        FusedLayerNorm(16, require_op=True)
    with pytest.raises(KernelUnavailableError, match="disabled by test"):
        fused_norm_layer(use_rms_norm=True, eps=1e-6, require_op=True)(16)
    x = paddle.randn([2, 16])
    with pytest.raises(KernelUnavailableError):
        fused_add_layer_norm(x, x, None, None, require_op=True)
    with pytest.raises(KernelUnavailableError, match="disabled by test"):
        ops.fused_ln(x)


def test_get_norm_layer_selects_fused_layers(op_ready):
    ln = get_norm_layer(use_rms_norm=False, eps=1e-6, fused=True)(32)
    rms = get_norm_layer(use_rms_norm=True, eps=1e-5, fused=True)(32)
    assert isinstance(ln, FusedLayerNorm) and ln._epsilon == 1e-6 and ln.use_op
    assert isinstance(rms, FusedRMSNorm) and rms.epsilon == 1e-5 and rms.use_op


def test_unsupported_dtype_uses_reference_path(op_ready):
    x = paddle.randn([3, 10], dtype="float64")
    ln = FusedLayerNorm(10, require_op=True)
    ln.to(dtype="float64")
    np.testing.assert_array_equal(ln(x).numpy(), F.layer_norm(x, [10], ln.weight, ln.bias, 1e-5).numpy())


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed: the CUDA compile check needs the CUDA toolkit")
@pytest.mark.slow
def test_cuda_harness_compiles_with_nvcc(tmp_path):
    """Compile-only check of the CUDA kernels (sm_80 + sm_90) through the standalone harness."""
    out = tmp_path / "fused_ln_harness"
    cmd = [
        NVCC, "-O3", "-std=c++17",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-I", str(REPO / "paddlemix" / "kernels" / "csrc"),
        str(REPO / "external_ops" / "cuda_harness" / "harness.cu"), "-o", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.is_file() and out.stat().st_size > 100_000
