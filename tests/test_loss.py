"""CLIP and SigLIP losses: values against numpy, and 2-process gradients against 1 process."""
import importlib.util
from pathlib import Path

import numpy as np
import paddle
import pytest

from launch_helper import launch_workers
from paddlemix.train.loss import ClipLoss, SigLipLoss

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_scripts" / "check_loss_grads.py"
WORLD = 2
GRAD_TOL = 1e-5


def _features(seed: int, n: int = 6, d: int = 5):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d))
    txt = img + 0.7 * rng.normal(size=(n, d))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype("float32"), txt.astype("float32")


def _np_cross_entropy(logits: np.ndarray) -> float:
    """Mean cross-entropy with target ``i`` for row ``i``."""
    m = logits.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(logz - np.diag(logits)))


def _np_clip_loss(img, txt, scale):
    logits = scale * img.astype("float64") @ txt.astype("float64").T
    return (_np_cross_entropy(logits) + _np_cross_entropy(logits.T)) / 2


def _np_siglip_loss(img, txt, scale, bias):
    logits = scale * img.astype("float64") @ txt.astype("float64").T + bias
    y = 2 * np.eye(len(img)) - 1
    return float(np.sum(np.logaddexp(0.0, -y * logits)) / len(img))


def _t(x):
    return paddle.to_tensor(x)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_equals_numpy(scale):
    img, txt = _features(0)
    loss = ClipLoss()(_t(img), _t(txt), paddle.to_tensor(scale, dtype="float32"))
    assert loss.shape == []
    np.testing.assert_allclose(float(loss), _np_clip_loss(img, txt, scale), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5), (117.0, -12.3)])
def test_siglip_loss_equals_numpy(scale, bias):
    img, txt = _features(1)
    loss = SigLipLoss()(_t(img), _t(txt), paddle.to_tensor(scale), paddle.to_tensor(bias))
    np.testing.assert_allclose(float(loss), _np_siglip_loss(img, txt, scale, bias), rtol=1e-6, atol=1e-6)


def test_siglip_loss_without_bias_equals_numpy():
    img, txt = _features(2)
    loss = SigLipLoss()(_t(img), _t(txt), paddle.to_tensor(5.0), None)
    np.testing.assert_allclose(float(loss), _np_siglip_loss(img, txt, 5.0, 0.0), rtol=1e-6, atol=1e-6)


def test_clip_loss_is_not_capped_when_a_pair_trails_by_more_than_64():
    """Paddle's CPU softmax clamps log-probabilities at -64; the loss must not."""
    eye = np.eye(4, dtype="float32")
    good = float(ClipLoss()(_t(eye), _t(eye), paddle.to_tensor(100.0)))
    bad = float(ClipLoss()(_t(eye), _t(eye[::-1].copy()), paddle.to_tensor(100.0)))
    assert 0.0 <= good < 1e-6
    assert bad == pytest.approx(100.0, abs=1e-4)


def test_half_precision_features_give_float32_loss_of_the_upcast_inputs():
    img, txt = _features(3)
    for dtype in ("float16", "bfloat16"):
        img_h, txt_h = _t(img).astype(dtype), _t(txt).astype(dtype)
        loss = ClipLoss()(img_h, txt_h, paddle.to_tensor(5.0))
        assert loss.dtype == paddle.float32
        ref = _np_clip_loss(img_h.astype("float32").numpy(), txt_h.astype("float32").numpy(), 5.0)
        np.testing.assert_allclose(float(loss), ref, rtol=1e-6)


def test_local_loss_labels_are_offset_by_rank():
    # Constructing with world_size > 1 starts no communication; only forward gathers.
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=1, world_size=2)
    assert loss.labels(4).numpy().tolist() == [4, 5, 6, 7]
    assert ClipLoss(local_loss=False, rank=1, world_size=2).labels(4).numpy().tolist() == [0, 1, 2, 3]


def test_siglip_signs_put_positives_on_the_rank_diagonal():
    y = SigLipLoss(rank=1, world_size=3).signs(2, 6).numpy()
    expected = -np.ones((2, 6), dtype="float32")
    expected[0, 2] = expected[1, 3] = 1
    np.testing.assert_array_equal(y, expected)


def test_bad_world_arguments_are_rejected():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="'bidir'"):
        SigLipLoss(dist_impl="bidir")


def _load_worker():
    spec = importlib.util.spec_from_file_location("check_loss_grads", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Run every case of the worker once on 2 CPU processes (gloo); return its files' folder."""
    out = tmp_path_factory.mktemp("loss_grads")
    launch_workers(WORKER, out, nproc=WORLD)
    return out


def _compare(case: str, folder: Path):
    worker = _load_worker()
    ref = worker.run_case(case, seed=0, rank=0, world_size=1, group=None, data_parallel=False)
    ranks = [dict(np.load(folder / f"{case}.rank{r}.npz")) for r in range(WORLD)]
    return ref, ranks


@pytest.mark.parametrize(
    "case", ["clip_local_gwg", "clip_global_gwg", "clip_local_gwg_default_group", "siglip"]
)
def test_two_rank_gradients_equal_one_process_on_the_global_batch(case, two_rank_results):
    """DataParallel averages the rank gradients; that average must be the full-batch gradient."""
    ref, ranks = _compare(case, two_rank_results)
    grads = [k for k in ref if k.startswith("grad.")]
    assert len(grads) == (6 if case == "siglip" else 5)
    for key in grads:
        for r in range(WORLD):
            np.testing.assert_allclose(ranks[r][key], ref[key], rtol=0, atol=GRAD_TOL, err_msg=f"{case} {key} rank {r}")
    # The global loss is the mean of the rank losses (local losses) or every rank's loss.
    mean_loss = np.mean([float(res["loss"]) for res in ranks])
    np.testing.assert_allclose(mean_loss, float(ref["loss"]), rtol=1e-6)
    if case == "clip_global_gwg":
        for res in ranks:
            np.testing.assert_allclose(float(res["loss"]), float(ref["loss"]), rtol=1e-6)


def test_gather_without_grad_scales_feature_gradients_by_one_over_world(two_rank_results):
    """Documents the cheap mode: other ranks' rows are constants, so each rank's feature
    gradient covers only its own rows and the DataParallel average is 1/W of the full one;
    ``logit_scale`` is computed on every rank and keeps its full gradient."""
    ref, ranks = _compare("clip_global_nograd", two_rank_results)
    for key in ref:
        if not key.startswith("grad."):
            continue
        factor = 1.0 if key == "grad.logit_scale" else 1.0 / WORLD
        np.testing.assert_allclose(ranks[0][key], factor * ref[key], rtol=0, atol=GRAD_TOL, err_msg=key)
