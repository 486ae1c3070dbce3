"""Model construction, configs, weights I/O and tower switches on tiny models."""
import json
import re
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddlemix
from paddlemix.models import CLIP, CLIPConfig, ConfigError
from paddlemix.zoo.loading import WeightLoadError
from paddlemix.zoo.registry import UnknownModelError, get_model_config

PARITY = Path(__file__).parent / "fixtures" / "parity"
TINY = PARITY / "openai_quickgelu"

OPEN_CLIP_COUNTS = {
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-H-14": 986_109_441,
    "ViT-g-14": 1_366_678_273,
    "ViT-bigG-14": 2_539_567_105,
}


def _rss_bytes() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def _count(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters())


@pytest.mark.parametrize("name,expected", sorted(OPEN_CLIP_COUNTS.items()))
def test_parameter_counts_match_open_clip(name, expected):
    before = _rss_bytes()
    with paddle.LazyGuard():
        model = CLIP(CLIPConfig.from_model_cfg(get_model_config(name)))
    assert _count(model) == expected
    # Lazy construction allocates no weights: far less than the fp32 size (bigG is 10 GB).
    assert _rss_bytes() - before < 200 * 2**20


def test_quickgelu_names_and_registry():
    names = paddlemix.list_models()
    for base in ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"]:
        assert base in names
        assert base + "-quickgelu" in names
        assert get_model_config(base + "-quickgelu")["quick_gelu"] is True
    # PaddleMIX's slash spelling resolves to the same config.
    assert get_model_config("ViT-L/14") == get_model_config("ViT-L-14")


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(UnknownModelError, match="ViT-B-32"):
        paddlemix.create_model("ViT-B-33")


def test_unknown_config_key_is_named(tmp_path):
    cfg = json.loads((TINY / "model_config.json").read_text())
    cfg["vision_cfg"]["widht"] = 64
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="widht"):
        paddlemix.create_model(path)


def test_wrong_type_is_named():
    cfg = json.loads((TINY / "model_config.json").read_text())
    cfg["text_cfg"]["layers"] = "2"
    with pytest.raises(ConfigError, match="layers"):
        CLIPConfig.from_model_cfg(cfg)


def test_missing_pretrained_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        paddlemix.create_model(TINY / "model_config.json", pretrained=tmp_path / "does-not-exist.bin")


def test_mismatched_checkpoint_names_keys(tmp_path):
    """Weights for another architecture fail loudly, naming what is missing or unexpected."""
    cfg = json.loads((TINY / "model_config.json").read_text())
    cfg["vision_cfg"]["layers"] = 3
    path = tmp_path / "deeper.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"visual\.transformer\.blocks\.2"):
        paddlemix.create_model(path, pretrained=TINY / "model.safetensors")
    cfg["vision_cfg"]["layers"] = 2
    cfg["embed_dim"] = 48
    path.write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="shape mismatch"):
        paddlemix.create_model(path, pretrained=TINY / "model.safetensors")


def _features(model, inputs):
    with paddle.no_grad():
        return (
            model.encode_image(paddle.to_tensor(inputs["image"])).numpy(),
            model.encode_text(paddle.to_tensor(inputs["text"])).numpy(),
        )


@pytest.fixture(scope="module")
def tiny():
    return paddlemix.create_model(TINY / "model_config.json", pretrained=TINY / "model.safetensors")


@pytest.fixture(scope="module")
def tiny_inputs():
    return np.load(TINY / "inputs.npz")


def test_save_pretrained_round_trip_fp32(tiny, tiny_inputs, tmp_path):
    tiny.save_pretrained(str(tmp_path))
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    expected = _features(tiny, tiny_inputs)
    for loaded in (CLIP.from_pretrained(str(tmp_path)), paddlemix.create_model(tmp_path)):
        loaded.eval()
        for a, b in zip(expected, _features(loaded, tiny_inputs)):
            np.testing.assert_array_equal(a, b)


def test_save_pretrained_round_trip_fp16(tiny_inputs, tmp_path):
    """fp16 files (as the zoo ships them) load back to exactly the fp16-rounded model."""
    model = paddlemix.create_model(TINY / "model_config.json", pretrained=TINY / "model.safetensors")
    model.to(dtype="float16")
    model.save_pretrained(str(tmp_path))
    model.to(dtype="float32")  # the fp16-rounded weights, computed in fp32
    expected = _features(model, tiny_inputs)
    loaded = paddlemix.create_model(tmp_path)
    assert loaded.visual.head.weight.dtype == paddle.float32
    for a, b in zip(expected, _features(loaded, tiny_inputs)):
        np.testing.assert_array_equal(a, b)
    ref = np.load(TINY / "outputs.npz")
    # and rounding to fp16 moved the features only slightly
    np.testing.assert_allclose(expected[0], ref["image_features"], atol=2e-3)


def test_legacy_pdparams_directory_loads_without_full_unpickling(tiny, tiny_inputs, tmp_path):
    tiny.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "model_state.pdparams").is_file()
    loaded = paddlemix.create_model(tmp_path)
    for a, b in zip(_features(tiny, tiny_inputs), _features(loaded, tiny_inputs)):
        np.testing.assert_array_equal(a, b)


def test_force_image_size_resizes_position_embedding(tiny_inputs):
    model = paddlemix.create_model(TINY / "model_config.json", pretrained=TINY / "model.safetensors",
                                   force_image_size=48)
    assert model.visual.positional_embedding.shape == [1 + 6 * 6, 64]
    with paddle.no_grad():
        out = model.encode_image(paddle.randn([1, 3, 48, 48]))
    assert out.shape == [1, 32]


def test_patch_dropout_only_in_training(tiny_inputs):
    model = paddlemix.create_model(TINY / "model_config.json", pretrained=TINY / "model.safetensors",
                                   force_patch_dropout=0.5)
    image = paddle.to_tensor(tiny_inputs["image"])
    ref = np.load(TINY / "outputs.npz")["image_features"]
    model.eval()
    np.testing.assert_allclose(model.encode_image(image).numpy(), ref, atol=1e-4)
    model.train()
    tokens, keep = model.visual.embed(image)
    assert tokens.shape[1] == 1 + 8 and keep.shape == [2, 8]  # 16 patches, half kept, plus class token
    assert not np.allclose(model.encode_image(image).numpy(), ref, atol=1e-3)


def test_gradient_checkpointing_gives_same_gradients(tiny_inputs):
    def grads(checkpointing: bool):
        model = paddlemix.create_model(TINY / "model_config.json", pretrained=TINY / "model.safetensors")
        model.train()
        model.set_grad_checkpointing(checkpointing)
        image_f, text_f, scale = model(paddle.to_tensor(tiny_inputs["image"]), paddle.to_tensor(tiny_inputs["text"]))
        loss = (scale * image_f @ text_f.T).sum()
        loss.backward()
        return {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert set(plain) == set(ckpt) and len(plain) > 50
    for name in plain:
        np.testing.assert_allclose(ckpt[name], plain[name], atol=1e-6, err_msg=name)


def _tiny_cfg(**text_overrides):
    cfg = json.loads((TINY / "model_config.json").read_text())
    cfg["text_cfg"].update(text_overrides)
    return CLIPConfig.from_model_cfg(cfg)


def test_text_pool_types_pick_the_right_token():
    paddle.seed(0)
    ids = paddle.to_tensor([[510, 5, 7, 511, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype="int64")
    base = CLIP(_tiny_cfg(proj_type="none"))
    base.eval()
    base.text.output_tokens = True
    _, tokens = base.text(ids)
    expected = {"argmax": tokens[:, 3], "first": tokens[:, 0], "last": tokens[:, -1]}
    for pool, want in expected.items():
        base.text.pool_type = pool
        pooled, _ = base.text(ids)
        np.testing.assert_allclose(pooled.numpy(), want.numpy(), atol=1e-6, err_msg=pool)
    base.text.pool_type, base.text.eos_id = "eos", 7
    pooled, _ = base.text(ids)
    np.testing.assert_allclose(pooled.numpy(), tokens[:, 2].numpy(), atol=1e-6)


def test_causal_mask_hides_the_future():
    paddle.seed(0)
    model = CLIP(_tiny_cfg(proj_type="none"))
    model.eval()
    model.text.output_tokens = True
    a = paddle.to_tensor([[510, 5, 7, 511] + [0] * 12], dtype="int64")
    b = paddle.to_tensor([[510, 5, 9, 511] + [0] * 12], dtype="int64")
    _, ta = model.text(a)
    _, tb = model.text(b)
    np.testing.assert_allclose(ta[:, :2].numpy(), tb[:, :2].numpy(), atol=1e-6)  # before the change
    assert not np.allclose(ta[:, 2].numpy(), tb[:, 2].numpy(), atol=1e-4)
    bidir = CLIP(_tiny_cfg(proj_type="none", no_causal_mask=True))
    bidir.eval()
    bidir.text.output_tokens = True
    _, ta = bidir.text(a)
    _, tb = bidir.text(b)
    assert not np.allclose(ta[:, 0].numpy(), tb[:, 0].numpy(), atol=1e-4)


def test_embed_cls_masks_padding_and_pools_the_class_token():
    paddle.seed(0)
    model = CLIP(_tiny_cfg(embed_cls=True, pad_id=0, correct_cls_mask=True, proj_bias=True))
    model.eval()
    assert model.text.positional_embedding.shape == [17, 64]
    assert model.text.text_projection.bias is not None
    ids = paddle.to_tensor([[510, 5, 511] + [0] * 13], dtype="int64")
    before = model.encode_text(ids).numpy()
    assert before.shape == (1, 32)
    # Padding keys are masked out: what the pad embedding holds cannot reach the pooled class token.
    emb = model.text.token_embedding.weight
    perturbed = emb.numpy()
    perturbed[0] += 1.0
    emb.set_value(perturbed)
    np.testing.assert_allclose(model.encode_text(ids).numpy(), before, atol=1e-6)
    perturbed[5] += np.linspace(-1.0, 1.0, perturbed.shape[1], dtype=np.float32)  # a real token does
    emb.set_value(perturbed)
    assert not np.allclose(model.encode_text(ids).numpy(), before, atol=1e-4)


def test_attentional_pooler_and_sincos():
    cfg = json.loads((TINY / "model_config.json").read_text())
    cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2,
                             pos_embed_type="sin_cos_2d", pool_type="avg")
    model = CLIP(CLIPConfig.from_model_cfg(cfg))
    model.eval()
    assert model.visual.positional_embedding.stop_gradient
    table = model.visual.positional_embedding.numpy()
    np.testing.assert_array_equal(table[0], 0.0)
    np.testing.assert_allclose(table[1 + 1, :16], np.sin(1.0 / 10000 ** (np.arange(16) / 16.0)), atol=1e-6)
    with paddle.no_grad():
        out = model.encode_image(paddle.randn([2, 3, 32, 32]))
    assert out.shape == [2, 32]


def test_lock_towers_freezes_all_but_unlocked_groups(tiny):
    model = paddlemix.create_model(TINY / "model_config.json")
    model.lock_image_tower(unlocked_groups=1)
    trainable = {n for n, p in model.named_parameters() if not p.stop_gradient and n.startswith("visual.")}
    assert trainable == {"visual.head.weight"}
    model.lock_text_tower(unlocked_layers=1)
    trainable = {n for n, p in model.named_parameters() if not p.stop_gradient and n.startswith("text.")}
    assert all(n.startswith(("text.transformer.blocks.1.", "text.ln_final", "text.text_projection")) for n in trainable)
    assert "text.transformer.blocks.1.attn.qkv.weight" in trainable


def test_bf16_precision_casts_weights():
    model = paddlemix.create_model(TINY / "model_config.json", pretrained=TINY / "model.safetensors",
                                   precision="bf16")
    assert model.visual.head.weight.dtype == paddle.bfloat16
    with pytest.raises(ValueError, match="precision"):
        paddlemix.create_model(TINY / "model_config.json", precision="fp8")
