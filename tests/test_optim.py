"""Parameter groups, per-group learning rate and weight decay, LAMB/AdamW updates, warmup-cosine."""
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import paddle
import pytest

from launch_helper import launch_workers
from paddlemix.models import CLIP, CLIPConfig
from paddlemix.train.loss import ClipLoss
from paddlemix.train.optim import (
    CosineWithWarmup,
    GroupedAdamW,
    build_optimizer,
    cosine_with_warmup,
    layer_id,
    param_groups,
)

TINY = Path(__file__).parent / "fixtures" / "parity" / "openai_quickgelu" / "model_config.json"

# A deeper model with different tower depths and the EVA / SigLIP / CoCa extras that add
# parameters the no-decay rules must catch (layer-scale gammas, q/v biases, sub-LN,
# logit_bias, the text class token).
DEEP_CFG = {
    "embed_dim": 16,
    "init_logit_bias": -10.0,
    "vision_cfg": {
        "image_size": 16, "layers": 4, "width": 32, "head_width": 16, "patch_size": 8, "ls_init_value": 0.1,
        "eva_model_name": "eva02-test", "rope": True, "intp_freq": True, "naiveswiglu": True, "subln": True,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 3,
                 "embed_cls": True, "ls_init_value": 0.1},
}


def _tiny():
    paddle.seed(0)
    return CLIP(CLIPConfig.from_model_cfg(json.loads(TINY.read_text())))


def _deep():
    paddle.seed(0)
    return CLIP(CLIPConfig.from_model_cfg(json.loads(json.dumps(DEEP_CFG))))


def _by_name(model, groups):
    """parameter name -> (group learning-rate multiplier, weight decay, group name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out, f"{names[id(p)]} in two groups"
            out[names[id(p)]] = (g["learning_rate"], g["weight_decay"], g["name"])
    return out


# ---------------------------------------------------------------- schedule


def test_warmup_reaches_exactly_the_peak_at_the_warmup_step_then_decays():
    sched = cosine_with_warmup(peak_lr=3e-4, warmup_steps=10, total_steps=50, min_lr=1e-5)
    lrs = []
    for _ in range(60):
        lrs.append(sched.get_lr())
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[10] == 3e-4
    assert max(lrs) == 3e-4 and lrs.index(max(lrs)) == 10
    np.testing.assert_allclose(lrs[:10], [3e-4 * s / 10 for s in range(10)], rtol=1e-12)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # strictly rising to the peak
    assert all(a > b for a, b in zip(lrs[10:50], lrs[11:51]))  # strictly falling after it
    assert lrs[30] == pytest.approx((3e-4 + 1e-5) / 2, rel=1e-12)  # cosine midpoint
    assert lrs[50:] == [1e-5] * 10


def test_schedule_without_warmup_starts_at_the_peak():
    sched = CosineWithWarmup(1.0, warmup_steps=0, total_steps=4)
    lrs = [sched.get_lr()] + [(sched.step(), sched.get_lr())[1] for _ in range(4)]
    np.testing.assert_allclose(lrs, [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 - math.cos(math.pi / 4)) / 2, 0.0],
                               atol=1e-15)


def test_schedule_state_resumes_the_same_sequence():
    a = cosine_with_warmup(1e-3, 5, 20)
    for _ in range(7):
        a.step()
    b = cosine_with_warmup(1e-3, 5, 20)
    b.set_state_dict(a.state_dict())
    for _ in range(5):
        assert a.get_lr() == b.get_lr()
        a.step()
        b.step()


@pytest.mark.parametrize("kwargs,match", [
    (dict(peak_lr=1.0, warmup_steps=10, total_steps=10), "warmup_steps=10, total_steps=10"),
    (dict(peak_lr=1.0, warmup_steps=-1, total_steps=10), "warmup_steps=-1"),
    (dict(peak_lr=1.0, warmup_steps=1, total_steps=10, min_lr=2.0), "min_lr=2.0"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_with_warmup(**kwargs)


# ---------------------------------------------------------------- groups


@pytest.mark.parametrize("build,depths", [(_tiny, {"visual": 2, "text": 2}), (_deep, {"visual": 4, "text": 3})])
def test_layer_decay_reaches_every_block_of_both_towers(build, depths):
    model = build()
    lr, ld = {"visual": 2e-4, "text": 5e-5}, {"visual": 0.6, "text": 0.8}
    groups = param_groups(model, lr=1e-4, weight_decay=0.1, visual_lr=lr["visual"], text_lr=lr["text"],
                          layer_decay=0.9, visual_ld=ld["visual"], text_ld=ld["text"])
    info = _by_name(model, groups)
    assert set(info) == {n for n, p in model.named_parameters() if not p.stop_gradient}
    for tower, depth in depths.items():
        base = lr[tower] / 1e-4
        blocks = {int(m.group(1)) for n in info if (m := re.match(rf"{tower}\.transformer\.blocks\.(\d+)\.", n))}
        assert blocks == set(range(depth))
        for name, (mult, _, _) in info.items():
            if not name.startswith(tower + "."):
                continue
            m = re.match(rf"{tower}\.transformer\.blocks\.(\d+)\.", name)
            if m:
                expected = base * ld[tower] ** (depth - int(m.group(1)))
            elif any(k in name for k in ("embed", "class_embedding", "cls_emb", "norm_pre")):
                expected = base * ld[tower] ** (depth + 1)
            else:  # final norm and projection
                assert re.match(rf"{tower}\.(norm|head|ln_final|text_projection)\.", name), name
                expected = base
            assert mult == pytest.approx(expected, rel=1e-12), name
    assert info["logit_scale"][:2] == (1.0, 0.0)


def test_no_weight_decay_for_biases_norms_gains_embeddings_and_temperature():
    model = _deep()
    info = _by_name(model, param_groups(model, lr=1e-3, weight_decay=0.05))
    decayed = {n for n, (_, wd, _) in info.items() if wd > 0}
    assert all(info[n][1] == 0.05 for n in decayed)
    params = dict(model.named_parameters())
    for name in info:
        p = params[name]
        must_skip = (p.ndim <= 1 or name.endswith(".bias") or name.endswith("_bias")
                     or name in model.no_weight_decay())
        assert (name not in decayed) == must_skip, name
    # Spot checks of each rule on real names.
    for name in ("logit_scale", "logit_bias", "visual.class_embedding", "visual.positional_embedding",
                 "text.positional_embedding", "text.cls_emb", "visual.transformer.blocks.0.ls1.gamma",
                 "visual.transformer.blocks.0.attn.q_bias", "visual.transformer.blocks.2.mlp.norm.weight",
                 "text.ln_final.weight", "visual.patch_embed.bias"):
        assert name not in decayed, name
    for name in ("visual.patch_embed.weight", "text.token_embedding.weight", "visual.head.weight",
                 "text.text_projection.weight", "text.transformer.blocks.2.mlp.fc2.weight"):
        assert name in decayed, name


def test_per_tower_weight_decay():
    model = _tiny()
    info = _by_name(model, param_groups(model, lr=1e-3, weight_decay=0.1, visual_wd=0.2, text_wd=0.0))
    assert info["visual.transformer.blocks.1.attn.qkv.weight"][1] == 0.2
    assert info["visual.head.weight"][1] == 0.2
    assert info["text.transformer.blocks.0.mlp.fc1.weight"][1] == 0.0
    assert info["visual.transformer.blocks.1.attn.qkv.bias"][1] == 0.0


def test_frozen_tower_is_left_out():
    model = _tiny()
    model.lock_image_tower()
    info = _by_name(model, param_groups(model, lr=1e-3, weight_decay=0.1))
    assert not any(n.startswith("visual.") for n in info)
    assert "text.transformer.blocks.1.attn.qkv.weight" in info


@pytest.mark.parametrize("name,expected", [
    ("transformer.blocks.3.attn.qkv.weight", 4),
    ("transformer.resblocks.0.attn.in_proj_weight", 1),
    ("blocks.11.mlp.fc1.weight", 12),
    ("encoder.layers.5.self_attn.k_proj.weight", 6),
    ("conv1.weight", 0),
    ("patch_embed.proj.weight", 0),
    ("pos_embed", 0),
    ("cls_token", 0),
    ("ln_pre.weight", 0),
    ("token_embedding.weight", 0),
    ("ln_post.weight", 13),
    ("proj", 13),
    ("attn_pool.query", 13),
])
def test_layer_id_on_open_clip_eva_and_hf_names(name, expected):
    assert layer_id(name, num_layers=12) == expected


def test_eva_style_names_get_their_tower_depth():
    class Tower(paddle.nn.Layer):
        def __init__(self, depth):
            super().__init__()
            self.pos_embed = self.create_parameter([3, 4])
            self.blocks = paddle.nn.LayerList([paddle.nn.Linear(4, 4) for _ in range(depth)])
            self.head = paddle.nn.Linear(4, 4)

    class Model(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.visual = Tower(3)
            self.text = paddle.nn.Layer()
            self.text.transformer = paddle.nn.Layer()
            self.text.transformer.resblocks = paddle.nn.LayerList([paddle.nn.Linear(4, 4) for _ in range(5)])

    model = Model()
    info = _by_name(model, param_groups(model, lr=1.0, weight_decay=0.0, layer_decay=0.5))
    assert info["visual.pos_embed"][0] == 0.5**4
    assert [info[f"visual.blocks.{i}.weight"][0] for i in range(3)] == [0.5**3, 0.5**2, 0.5]
    assert info["visual.head.weight"][0] == 1.0
    assert [info[f"text.transformer.resblocks.{i}.bias"][0] for i in range(5)] == [0.5**(5 - i) for i in range(5)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=0.0, weight_decay=0.1), "lr must be > 0"),
    (dict(lr=1e-3, weight_decay=0.1, layer_decay=1.5), r"layer_decay must be in \(0, 1.0\]"),
    (dict(lr=1e-3, weight_decay=0.1, text_ld=0.0), "text_ld"),
    (dict(lr=1e-3, weight_decay=-0.1), "weight_decay must be >= 0"),
])
def test_param_groups_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        param_groups(_tiny(), **kwargs)


# ---------------------------------------------------------------- optimizers


def _loss_backward(model, seed=0):
    rng = np.random.default_rng(seed)
    images = paddle.to_tensor(rng.normal(size=(4, 3, *model.image_size)).astype("float32"))
    text = paddle.to_tensor(rng.integers(1, model.text.vocab_size, size=(4, model.context_length)))
    img, txt, scale = model(images, text)[:3]
    ClipLoss()(img, txt, scale).backward()


def _snapshot(model):
    return {n: (p.numpy().copy(), None if p.grad is None else p.grad.numpy().copy())
            for n, p in model.named_parameters()}


HYPER = dict(weight_decay=0.1, visual_lr=3e-3, text_lr=5e-4, visual_wd=0.2, layer_decay=0.7, text_ld=0.5)


def test_adamw_step_applies_each_groups_lr_and_decay():
    """One AdamW step: ``p <- p * (1 - lr_p * wd_p) - lr_p * g / (|g| + eps)`` for every parameter,
    with ``lr_p`` the scheduler's value times the group multiplier."""
    model = _tiny()
    sched = cosine_with_warmup(1e-3, warmup_steps=4, total_steps=20)
    for _ in range(2):
        sched.step()  # mid-warmup: lr 5e-4, so the multiplier must scale the scheduled value
    opt = build_optimizer(model, "adamw", sched, lr=1e-3, eps=1e-8, **HYPER)
    assert isinstance(opt, GroupedAdamW) and not isinstance(opt._parameter_list[0], dict)
    info = _by_name(model, param_groups(model, lr=1e-3, **HYPER))
    _loss_backward(model)
    before = _snapshot(model)
    opt.step()
    assert opt.get_lr() == 5e-4
    for name, p in model.named_parameters():
        mult, wd, _ = info[name]
        lr_p = 5e-4 * mult
        assert opt.effective_lr(p) == pytest.approx(lr_p, rel=1e-12)
        assert opt.effective_weight_decay(p) == wd
        w, g = before[name]
        expected = w * (1 - lr_p * wd) - lr_p * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(p.numpy(), expected, rtol=0, atol=2e-7 + 1e-6 * lr_p, err_msg=name)
    # A group multiplier below 1 really shrinks the step: first vs last visual block.
    assert info["visual.transformer.blocks.0.attn.qkv.weight"][0] == pytest.approx(3 * 0.7**2, rel=1e-12)


def test_grouped_adamw_equals_paddle_param_groups():
    """Same numbers as handing the groups to Paddle's own AdamW param-group API (which
    fleet sharding rejects): the per-parameter lookup reproduces Paddle's group semantics."""
    results = []
    for use_paddle_groups in (False, True):
        model = _tiny()
        sched = cosine_with_warmup(1e-3, warmup_steps=0, total_steps=10)
        if use_paddle_groups:
            groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, lr=1e-3, **HYPER)]
            opt = paddle.optimizer.AdamW(learning_rate=sched, parameters=groups, weight_decay=0.0)
        else:
            opt = build_optimizer(model, "adamw", sched, **HYPER)
        for step in range(3):
            _loss_backward(model, seed=step)
            opt.step()
            opt.clear_grad()
            sched.step()
        results.append({n: p.numpy() for n, p in model.named_parameters()})
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)


def test_lamb_step_applies_each_groups_lr_and_decay():
    """One LAMB step: ``r = g / (|g| + eps) + wd * p``; decayed tensors scale ``r`` by the
    trust ratio ``|p| / |r|``, tensors without decay take ``r`` as is (Paddle's default)."""
    model = _tiny()
    for _, p in model.named_parameters():  # no all-zero tensors, so every trust ratio is defined
        p.set_value(p + 0.01)
    opt = build_optimizer(model, "lamb", 2e-3, eps=1e-6, **HYPER)
    info = _by_name(model, param_groups(model, lr=2e-3, **HYPER))
    _loss_backward(model)
    before = _snapshot(model)
    opt.step()
    for name, p in model.named_parameters():
        mult, wd, _ = info[name]
        w, g = before[name]
        r = g / (np.abs(g) + 1e-6) + wd * w
        trust = np.linalg.norm(w) / np.linalg.norm(r) if wd > 0 else 1.0
        expected = w - 2e-3 * mult * trust * r
        np.testing.assert_allclose(p.numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=name)


def test_global_norm_clipping_happens_inside_the_step():
    """With eps=1 the Adam step depends on the gradient's size, so clipping is visible."""
    model = _tiny()
    opt = build_optimizer(model, "adamw", 1e-2, eps=1.0, grad_clip_norm=0.05)
    _loss_backward(model)
    before = _snapshot(model)
    norm = math.sqrt(sum(float((g.astype("float64") ** 2).sum()) for _, g in before.values()))
    assert norm > 0.05
    opt.step()
    for name, p in model.named_parameters():
        w, g = before[name]
        gc = g * (0.05 / norm)
        np.testing.assert_allclose(p.numpy(), w - 1e-2 * gc / (np.abs(gc) + 1.0), rtol=0, atol=1e-8, err_msg=name)


def test_betas_and_unknown_names():
    opt = build_optimizer(_tiny(), "AdamW", 1e-3, betas=(0.8, 0.95), eps=1e-6)
    assert (opt._beta1, opt._beta2, opt._epsilon) == (0.8, 0.95, 1e-6)
    with pytest.raises(ValueError, match="'sgd'"):
        build_optimizer(_tiny(), "sgd", 1e-3)


# ---------------------------------------------------------------- fleet sharding

SHARD_WORKER = Path(__file__).parent / "dist_scripts" / "check_sharded_optimizer.py"


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    """Both optimizers trained 3 steps under ``sharding_degree=2`` on 2 CPU processes (gloo)."""
    out = tmp_path_factory.mktemp("sharded_opt")
    launch_workers(SHARD_WORKER, out)
    return out


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_sharding_stage1_updates_equal_one_process(name, sharded_results):
    """Fleet's sharding optimizer rejects param groups; the per-parameter lookup survives it."""
    spec = importlib.util.spec_from_file_location("check_sharded_optimizer", SHARD_WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    ref = worker.train_steps(name, sharded=False)
    paddle.seed(0)
    init = {n: p.numpy() for n, p in CLIP(CLIPConfig.from_model_cfg(json.loads(TINY.read_text()))).named_parameters()}
    assert max(np.abs(ref[n] - init[n]).max() for n in ref) > 1e-3  # the steps moved the weights
    for rank in range(2):
        got = dict(np.load(sharded_results / f"{name}.rank{rank}.npz"))
        assert str(got.pop("__inner_optimizer__")) == "DygraphShardingOptimizer"
        assert set(got) == set(ref)
        for key in ref:
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6, err_msg=f"{name} rank {rank} {key}")
