"""MLP-Mixer CLIP: tower shapes, causal text mixing, parameter counts, clip.load, and training."""
import logging

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlemix import clip
from paddlemix.data.demo import BACKGROUNDS, COLOURS, SHAPES, draw_shape
from paddlemix.data.tokenizer import SimpleTokenizer
from paddlemix.factory import create_model
from paddlemix.models import CLIP, CLIPConfig, ConfigError
from paddlemix.models.mixer import MixerTextTower, MixerVisionTower, made_masks
from paddlemix.zoo.registry import get_model_config


def _tiny_cfg(**text_overrides) -> dict:
    text = {"block_type": "mixer", "context_length": 16, "vocab_size": 49408, "width": 32, "layers": 2,
            "token_mlp_ratio": 1.0, "mlp_ratio": 2.0}
    text.update(text_overrides)
    return {
        "embed_dim": 24,
        "vision_cfg": {"block_type": "mixer", "image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                       "token_mlp_ratio": 0.5, "mlp_ratio": 2.0, "pool_type": "avg"},
        "text_cfg": text,
    }


def _build(cfg: dict, seed: int = 0) -> CLIP:
    paddle.seed(seed)
    model = CLIP(CLIPConfig.from_model_cfg(cfg))
    model.eval()
    return model


def _count(model) -> int:
    return sum(int(np.prod(p.shape)) for p in model.parameters())


def test_forward_shapes_and_tokens():
    cfg = _tiny_cfg(output_tokens=True)
    cfg["vision_cfg"]["output_tokens"] = True
    model = _build(cfg)
    assert isinstance(model.visual, MixerVisionTower) and isinstance(model.text, MixerTextTower)
    image = paddle.randn([3, 3, 32, 32])
    text = paddle.randint(1, 1000, [3, 16])
    pooled, tokens = model.visual(image)
    assert list(pooled.shape) == [3, 24] and list(tokens.shape) == [3, 16, 32]  # 4x4 patches
    pooled, tokens = model.text(text)
    assert list(pooled.shape) == [3, 24] and list(tokens.shape) == [3, 16, 32]
    image_features, text_features, scale = model(image, text)
    assert list(image_features.shape) == [3, 24] and list(text_features.shape) == [3, 24]
    np.testing.assert_allclose(paddle.linalg.norm(image_features, axis=-1).numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(scale.numpy(), 1 / 0.07, rtol=1e-5)


@pytest.mark.parametrize("num_tokens,hidden", [(7, 16), (16, 16), (16, 8), (77, 256)])
def test_made_masks_connect_exactly_the_causal_pairs(num_tokens, hidden):
    mask_in, mask_out = made_masks(num_tokens, hidden)
    reach = mask_in @ mask_out  # paths input i -> hidden -> output o
    i, o = np.meshgrid(np.arange(num_tokens), np.arange(num_tokens), indexing="ij")
    assert not reach[i > o].any()  # nothing flows backwards
    if hidden >= num_tokens:
        assert reach[i <= o].all()  # and every allowed pair is connected


def test_text_mixer_is_causal():
    model = _build(_tiny_cfg(output_tokens=True))
    rng = np.random.default_rng(0)
    text = rng.integers(1, 49406, (2, 16))
    base = model.text(paddle.to_tensor(text))[1].numpy()
    for j in (0, 5, 15):
        changed = text.copy()
        changed[:, j] = (changed[:, j] + 17) % 49406
        out = model.text(paddle.to_tensor(changed))[1].numpy()
        np.testing.assert_array_equal(out[:, :j], base[:, :j])  # earlier outputs: bit-identical
        assert np.abs(out[:, j:] - base[:, j:]).max() > 1e-3  # this and later ones see the change
    # without the causal masks a later token changes earlier outputs
    bidirectional = _build(_tiny_cfg(output_tokens=True, no_causal_mask=True))
    a = bidirectional.text(paddle.to_tensor(text))[1].numpy()
    changed = text.copy()
    changed[:, 15] += 1
    b = bidirectional.text(paddle.to_tensor(changed))[1].numpy()
    assert np.abs(a[:, 0] - b[:, 0]).max() > 1e-4


def test_argmax_pooling_ignores_padding_and_short_inputs_are_padded():
    model = _build(_tiny_cfg())
    tokenizer = SimpleTokenizer(context_length=16)
    text = tokenizer(["a red circle", "a blue star on a grey background"])
    pooled = model.encode_text(text).numpy()
    garbage = text.numpy().copy()
    garbage[0, 6:] = 123  # after the EOT at position 4 of row 0 (ids < EOT, so argmax still finds it)
    np.testing.assert_array_equal(model.encode_text(paddle.to_tensor(garbage)).numpy()[0], pooled[0])
    short = model.encode_text(text[:, :10]).numpy()  # right-padded with pad_id inside the tower
    np.testing.assert_allclose(short, pooled, atol=1e-6)
    with pytest.raises(ValueError, match="context length 16"):
        model.encode_text(paddle.zeros([1, 17], dtype="int64"))
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        model.encode_image(paddle.zeros([1, 3, 64, 64]))


def _mixer_param_formula(cfg: dict) -> int:
    """Dense parameter count: stem, per block 2 norms + token MLP + channel MLP, final norm, heads."""
    e, v, t = cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]

    def blocks(width, layers, tokens, token_ratio, mlp_ratio):
        ds, dc = int(width * token_ratio), int(width * mlp_ratio)
        per = 2 * 2 * width + (tokens * ds + ds + ds * tokens + tokens) + (width * dc + dc + dc * width + width)
        return layers * per

    vw, p = v["width"], v["patch_size"]
    n = (v["image_size"] // p) ** 2
    vision = 3 * p * p * vw + vw + blocks(vw, v["layers"], n, v["token_mlp_ratio"], v["mlp_ratio"]) + 2 * vw + vw * e
    tw, L = t["width"], t["context_length"]
    text = t["vocab_size"] * tw + blocks(tw, t["layers"], L, t["token_mlp_ratio"], t["mlp_ratio"]) + 2 * tw + tw * e
    return vision + text + 1  # + logit_scale


@pytest.mark.parametrize("name", ["Mixer-B-32", "Mixer-L-16", "Mixer-tiny-demo"])
def test_parameter_count_by_formula(name):
    cfg = get_model_config(name)
    with paddle.LazyGuard():
        model = CLIP(CLIPConfig.from_model_cfg(cfg))
    assert _count(model) == _mixer_param_formula(cfg)


def test_mixer_b32_numbers():
    # Image tower, by hand: stem 3*32*32*768 + 768 = 2,360,064; per block 4*768 (norms)
    # + 2*49*384 + 384 + 49 (token MLP) + 2*768*3072 + 3072 + 768 (channel MLP) = 4,763,569, x12;
    # final norm 1,536; projection 768*512 = 393,216. The MLP-Mixer paper's B/32 body plus its
    # 768x1000 classifier is its "60M"; here the classifier is the 768x512 projection.
    with paddle.LazyGuard():
        model = create_model("Mixer-B-32")
    assert _count(model.visual) == 2_360_064 + 12 * 4_763_569 + 1_536 + 393_216 == 59_917_644
    assert _count(model) == 111_175_913


def test_clip_load_mixer_names(tmp_path, caplog):
    assert {"Mixer-B/32", "Mixer-B/16", "Mixer-S/32", "Mixer-L/16"} <= set(clip.available_models())
    assert "ViT-B/32" in clip.available_models()
    with caplog.at_level(logging.WARNING, logger="paddlemix.clip"):
        model, preprocess = clip.load("Mixer-B/32")
    assert "randomly initialised" in caplog.text
    assert isinstance(model, clip.CLIPWithLogits) and isinstance(model.visual, MixerVisionTower)
    assert model.visual.grid_size == (7, 7) and model.context_length == 77
    from PIL import Image

    image = preprocess(Image.new("RGB", (300, 200), (200, 30, 30))).unsqueeze(0)
    assert list(image.shape) == [1, 3, 224, 224]
    with paddle.no_grad():
        logits_per_image, logits_per_text = model(image, clip.tokenize(["a red square", "a blue circle"]))
    assert list(logits_per_image.shape) == [1, 2] and list(logits_per_text.shape) == [2, 1]


def test_save_and_load_round_trip(tmp_path):
    model = create_model("Mixer-tiny-demo")
    model.save_pretrained(str(tmp_path / "mixer"))
    loaded, _ = clip.load("Mixer-tiny-demo", pretrained=tmp_path / "mixer")
    image = paddle.randn([2, 3, 64, 64])
    text = SimpleTokenizer(context_length=16)(["a red circle", "a blue star"])
    with paddle.no_grad():
        np.testing.assert_array_equal(loaded.encode_image(image).numpy(), model.encode_image(image).numpy())
        np.testing.assert_array_equal(loaded.encode_text(text).numpy(), model.encode_text(text).numpy())


@pytest.mark.parametrize(
    "tower,key,value,match",
    [
        ("vision_cfg", "pool_type", "tok", "no class token"),
        ("vision_cfg", "patch_dropout", 0.5, "patch_dropout"),
        ("vision_cfg", "block_type", "conv", "block_type"),
        ("text_cfg", "embed_cls", True, "embed_cls"),
        ("text_cfg", "pool_type", "first", "first token"),
        ("text_cfg", "token_mlp_ratio", 0.0, "token_mlp_ratio"),
    ],
)
def test_config_errors_name_the_key(tower, key, value, match):
    cfg = _tiny_cfg()
    cfg[tower][key] = value
    with pytest.raises(ConfigError, match=match):
        CLIP(CLIPConfig.from_model_cfg(cfg))


def test_lock_and_grad_checkpointing():
    model = _build(_tiny_cfg())
    model.lock_image_tower(unlocked_groups=1)
    trainable = {n for n, p in model.visual.named_parameters() if not p.stop_gradient}
    assert trainable == {"head.weight"}
    model.lock_text_tower(unlocked_layers=1)
    trainable = {n for n, p in model.text.named_parameters() if not p.stop_gradient}
    assert trainable and all(n.startswith(("transformer.blocks.1.", "ln_final.", "text_projection.")) for n in trainable)
    model = _build(_tiny_cfg())
    model.set_grad_checkpointing(True)
    model.train()
    image, text = paddle.randn([2, 3, 32, 32]), paddle.randint(1, 1000, [2, 16])
    img, txt, scale = model(image, text)
    (img * txt).sum().backward()
    grad = model.visual.transformer.blocks[0].token_mlp.fc1.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------- training
def _shape_pictures(n_per_class: int, seed: int, image_size: int = 32):
    """Pictures of the demo data set (coloured shapes on neutral backgrounds) with class indices."""
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in sorted(COLOURS) for s in SHAPES]
    backgrounds = list(BACKGROUNDS.values())
    images, labels = [], []
    for label, (colour, shape) in enumerate(classes):
        for _ in range(n_per_class):
            radius = rng.uniform(0.22, 0.32) * image_size
            center = rng.uniform(radius, image_size - radius, 2)
            pic = draw_shape(shape, COLOURS[colour], backgrounds[rng.integers(len(backgrounds))], tuple(center),
                             radius, angle_deg=float(rng.uniform(0, 360)), image_size=image_size)
            images.append(np.asarray(pic, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
            labels.append(label)
    names = [f"{c} {s}" for c, s in classes]
    return np.stack(images), np.array(labels), names


def test_mixer_clip_trains_and_beats_chance():
    """A tiny Mixer CLIP learns the (colour, shape) classes of the demo data with a plain loop.

    100 steps of 16 pairs take ~20 s on 2 cores; in that budget the model reliably learns the
    colours (the loss approaches ln 4, shapes within a colour are still confused), which already
    puts zero-shot accuracy at several times the 1/16 chance level.
    """
    cfg = _tiny_cfg()
    cfg["vision_cfg"].update(width=64, token_mlp_ratio=0.5, mlp_ratio=2.0)
    cfg["text_cfg"].update(width=64)
    cfg["init_logit_scale"] = float(np.log(10.0))  # a cooler start than 1/0.07 suits 16-pair batches
    model = _build(cfg, seed=0)
    model.train()
    tokenizer = SimpleTokenizer(context_length=16)
    train_images, train_labels, names = _shape_pictures(12, seed=1)
    templates = ["a photo of a {}.", "a {}", "a drawing of a {}.", "there is a {} in this image"]
    captions = tokenizer([t.format(n) for n in names for t in templates]).numpy().reshape(16, len(templates), 16)
    base_lr, warmup = 2e-3, 10
    opt = paddle.optimizer.AdamW(learning_rate=base_lr, parameters=model.parameters(), weight_decay=0.01)
    rng = np.random.default_rng(2)
    labels = paddle.arange(16)
    losses = []
    for step in range(100):
        # one picture per class, so every other item of the batch is a true negative
        pick = np.array([rng.choice(np.flatnonzero(train_labels == c)) for c in range(16)])
        text = captions[np.arange(16), rng.integers(len(templates), size=16)]
        image_features, text_features, scale = model(paddle.to_tensor(train_images[pick]), paddle.to_tensor(text))
        logits = scale * image_features @ text_features.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        opt.set_lr(base_lr * min(1.0, (step + 1) / warmup))
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    chance_loss = np.log(16)  # uniform logits over the batch
    assert first > chance_loss
    assert last < 0.6 * first and last < 0.75 * chance_loss, (first, last)

    # zero-shot classification of held-out pictures: nearest class prompt, chance is 1/16
    model.eval()
    test_images, test_labels, _ = _shape_pictures(4, seed=3)
    with paddle.no_grad():
        img = model.encode_image(paddle.to_tensor(test_images), normalize=True)
        prompts = model.encode_text(tokenizer([f"a photo of a {n}." for n in names]), normalize=True)
        predictions = (img @ prompts.T).argmax(axis=-1).numpy()
    accuracy = float((predictions == test_labels).mean())
    assert accuracy >= 0.2, accuracy  # > 3x chance (6.25 %); 13+ of 64 by luck has p = 1.4e-4
