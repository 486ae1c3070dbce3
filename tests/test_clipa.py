"""CLIPA: BERT WordPiece tokenizer, the CLIPA repository's BigVision configs, checkpoint loading,
position-embedding resizing and CLIPA's image/text token reduction."""
import html
import json
import pickle
import random
import unicodedata
from pathlib import Path

import ftfy
import numpy as np
import paddle
import pytest
from PIL import Image

import paddlemix
from paddlemix.data.bert_tokenizer import BUNDLED_VOCABS, BertTokenizer, resolve_vocab_file
from paddlemix.factory import create_model, create_model_and_transforms, get_tokenizer
from paddlemix.zoo.checkpoint import save_safetensors
from paddlemix.zoo.key_maps import resize_pos_embed
from paddlemix.zoo.registry import get_model_config

VOCAB = Path(__file__).parent / "fixtures" / "bert_vocab" / "vocab.txt"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# ids of the fixture vocabulary (see fixtures/bert_vocab/README.md)
PAD, UNK, CLS, SEP, MASK = 0, 2, 3, 4, 5


def _tok(**kwargs) -> BertTokenizer:
    kwargs.setdefault("context_length", 10)
    return BertTokenizer(VOCAB, **kwargs)


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize(
    "text,expected",
    [
        # a=48 photo=117 of=112 dog=118 .=19
        ("A photo of a dog.", [CLS, 48, 117, 112, 48, 118, 19, SEP, PAD, PAD]),
        # un ##aff ##able | cat ##s | play ##ing: longest match first, continuations with ##
        ("Unaffable cats playing", [CLS, 122, 123, 124, 119, 102, 120, 121, SEP, PAD]),
        # accents stripped after NFD, lower-cased; CJK ideographs become single words
        ("Café NAÏVE 中文", [CLS, 125, 126, 149, 150, SEP, PAD, PAD, PAD, PAD]),
        # special-token strings in the text stay whole; '[mask]' in lower case is ordinary text;
        # over-long text keeps its first 8 pieces ('[' m ##a ##s ##k, not ']') and ends in [SEP]
        ("x[MASK]y [mask]", [CLS, 71, MASK, 72, 28, 60, 84, 102, 94, SEP]),
        # a word whose rest cannot be matched is one [UNK]; '!' and '$' are punctuation
        ("dog😀! $5", [CLS, UNK, 6, 9, 43, SEP, PAD, PAD, PAD, PAD]),
        # control characters dropped, tabs/newlines are spaces
        ("red\x00\tcar\ncat\u200b", [CLS, 132, 138, 119, SEP, PAD, PAD, PAD, PAD, PAD]),
        ("", [CLS, SEP] + [PAD] * 8),
    ],
)
def test_hand_computed_ids(text, expected):
    assert _tok().batch_encode([text])[0].tolist() == expected


def test_truncation_and_sep_variants():
    text = "the big brown dog"  # the=111 big=127 brown=129 dog=118
    assert _tok(context_length=5).batch_encode(text)[0].tolist() == [CLS, 111, 127, 129, SEP]
    # open_clip's strip_sep_token: the HF layout, then [SEP] -> [PAD]
    assert _tok(context_length=5, strip_sep_token=True).batch_encode(text)[0].tolist() == [CLS, 111, 127, 129, PAD]
    assert _tok(context_length=8, strip_sep_token=True).batch_encode("a [SEP] dog")[0].tolist() == [
        CLS, 48, PAD, 118, PAD, PAD, PAD, PAD]
    # big_vision / CLIPA repository: no [SEP] at all, one more content token
    assert _tok(context_length=5, add_sep_token=False).batch_encode(text)[0].tolist() == [CLS, 111, 127, 129, 118]
    assert _tok(context_length=6, add_sep_token=False).batch_encode("a dog")[0].tolist() == [CLS, 48, 118, 0, 0, 0]
    # call-time context length, and a paddle tensor from __call__
    out = _tok()(["a dog", "a cat"], context_length=4)
    assert out.dtype == paddle.int64 and out.numpy().tolist() == [[CLS, 48, 118, SEP], [CLS, 48, 119, SEP]]
    with pytest.raises(ValueError, match="context_length"):
        _tok(context_length=1)


def test_word_length_limit():
    tok = _tok(context_length=128)
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99


def test_open_clip_clean_whitespace_mode():
    tok = _tok(clean="whitespace")
    # ftfy repairs mojibake, HTML entities are unescaped twice, whitespace collapses
    assert tok.tokenize("cafÃ©  &amp;amp;\u00a0dog") == ["cafe", "&", "dog"]
    assert _tok(clean="none").tokenize("&amp;") == ["&", "a", "##m", "##p", ";"]
    with pytest.raises(ValueError, match="clean"):
        _tok(clean="canonical")


def test_decode_and_pickle():
    tok = _tok()
    ids = tok.batch_encode("unaffable cats")[0]
    assert tok.decode(ids) == "unaffable cats"
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.batch_encode("a photo of a dog").tolist() == tok.batch_encode("a photo of a dog").tolist()
    # specials kept on request; a leading continuation piece stays as written; unknown ids are named
    assert tok.decode([CLS, 122, 123, SEP, PAD], skip_special_tokens=False) == "[CLS] unaff [SEP] [PAD]"
    assert tok.decode([CLS, 123, 122, 123, 124]) == "##aff unaffable"
    with pytest.raises(ValueError, match="152"):
        tok.decode([48, 152])


def test_batches_leave_no_thread_pool_for_a_fork(capfd):
    """Data-loader workers fork after the main process tokenized (e.g. zero-shot prompts); had
    ``tokenizers`` used its thread pool, each fork would print a deadlock warning."""
    import os

    _tok().batch_encode(["a photo of a dog"] * 256)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert "huggingface/tokenizers" not in capfd.readouterr().err


def _random_texts(n: int, seed: int):
    """Random strings over ASCII, special tokens and code points assigned since Unicode 3.2.

    Recently assigned characters are left out on purpose: the Rust reference classifies
    characters with older Unicode tables than Python 3.11's (14.0), so they may differ there.
    """
    rng = random.Random(seed)
    pool = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'\"-_#$%^&*()[]{}<>/\\|~`\t\n")
    pool += ["[MASK]", "[SEP]", "[CLS]", "photo", "dog", "##s", "\u0301", "\u00e9", "\u3000", "\u200b", "\x00", "\x85"]
    while len(pool) < 600:
        c = chr(rng.randrange(0x80, 0x30000))
        if not 0xD800 <= ord(c) < 0xE000 and unicodedata.ucd_3_2_0.category(c) == unicodedata.category(c) != "Cn":
            pool.append(c)
    return ["".join(rng.choice(pool) for _ in range(rng.randrange(0, 30))) for _ in range(n)]


def _reference(context_length: int):
    """HF's Rust WordPiece tokenizer, which open_clip's ``HFTokenizer`` runs (installed with paddlenlp)."""
    from tokenizers import BertWordPieceTokenizer

    vocab = {token: i for i, token in enumerate(VOCAB.read_text(encoding="utf-8").splitlines())}
    ref = BertWordPieceTokenizer(vocab, lowercase=True)
    ref.enable_truncation(max_length=context_length)
    ref.enable_padding(length=context_length, pad_id=PAD, pad_token="[PAD]")
    return ref


def test_ids_equal_hf_rust_tokenizer_on_random_text():
    texts = _random_texts(3000, seed=0)
    ref = _reference(24)
    mine = _tok(context_length=24, clean="none").batch_encode(texts)
    expected = np.array([e.ids for e in ref.encode_batch(texts)])
    mismatched = [t for t, a, b in zip(texts, mine, expected) if a.tolist() != b.tolist()]
    assert not mismatched, f"{len(mismatched)} differ, e.g. {ascii(mismatched[0])}"


def test_open_clip_pipeline_equals_clean_then_hf():
    """open_clip: whitespace clean (ftfy, unescape twice, collapse), HF ids, then [SEP] -> 0."""
    texts = ["  A photo of a DOG &amp;amp; a cat  ", "cafÃ© naïve", "big\n\nred   car!", "中文 山 [MASK]"]
    texts += _random_texts(300, seed=1)
    ref = _reference(16)
    for text in texts:
        cleaned = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())
        expected = np.array(ref.encode(cleaned).ids)
        expected[expected == SEP] = PAD
        got = _tok(context_length=16, strip_sep_token=True).batch_encode(text)[0]
        assert got.tolist() == expected.tolist(), ascii(text)


def test_ids_equal_fixed_ids_of_the_hand_written_tokenizer():
    """Ids frozen from the hand-written WordPiece this module ran before it moved onto HF
    ``tokenizers`` (fixtures/bert_vocab/README.md): random text on the test vocabulary, and the
    tokenizer fixture's captions (mojibake, HTML, emoji, CJK, over-long) on the bundled
    bert-base-uncased in open_clip's CLIPA and big_vision's layouts."""
    fixed = json.loads((VOCAB.parent / "expected_ids.json").read_text(encoding="utf-8"))
    case = fixed["random_tiny_vocab"]
    got = _tok(context_length=case["context_length"], clean=case["clean"]).batch_encode(case["texts"])
    assert got.tolist() == case["ids"]
    captions = json.loads((VOCAB.parent.parent / "tokenizer" / "tokens.json").read_text(encoding="utf-8"))["texts"]
    bundled = BUNDLED_VOCABS["bert-base-uncased"]
    clipa = BertTokenizer(bundled, context_length=32, strip_sep_token=True)
    assert clipa.batch_encode(captions).tolist() == fixed["captions_bert_base_uncased_clipa"]["ids"]
    bigvision = BertTokenizer(bundled, context_length=16, add_sep_token=False, clean="none")
    assert bigvision.batch_encode(captions).tolist() == fixed["captions_bert_base_uncased_bigvision"]["ids"]


def test_vocab_resolution_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLEMIX_HOME", str(tmp_path / "home"))
    # a vocabulary the package does not bundle: the error names where to put it
    with pytest.raises(FileNotFoundError, match=r"home/vocab/bert-base-cased/vocab\.txt.*vocab_file="):
        resolve_vocab_file("bert-base-cased")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        resolve_vocab_file("bert-base-uncased", vocab_file=tmp_path / "nope.txt")
    # the bundled copy when nothing else is there
    assert resolve_vocab_file("bert-base-uncased") == BUNDLED_VOCABS["bert-base-uncased"]
    # the cache location
    cached = tmp_path / "home" / "vocab" / "bert-base-uncased" / "vocab.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(VOCAB.read_bytes())
    assert resolve_vocab_file("bert-base-uncased") == cached
    # a model directory's vocab.txt wins over the cache
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_bytes(VOCAB.read_bytes())
    assert resolve_vocab_file("bert-base-uncased", model_dir=model_dir) == model_dir / "vocab.txt"
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        BertTokenizer(bad)


def test_bundled_bert_base_uncased_vocab():
    """The shipped vocabulary is HF's bert-base-uncased vocab.txt byte for byte, and every CLIPA
    architecture tokenizes with it out of the box."""
    import gzip
    import hashlib

    raw = gzip.decompress(BUNDLED_VOCABS["bert-base-uncased"].read_bytes())
    assert hashlib.sha256(raw).hexdigest() == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    clipa = [m for m in paddlemix.list_models() if "CLIPA" in m or "BigVision" in m]
    assert len(clipa) == 8
    for name in clipa:
        tok = get_tokenizer(name)
        assert tok.vocab_size == 30522
    tok = get_tokenizer("ViT-L-14-CLIPA")
    # [CLS] a photo of a dog [SEP->PAD]: bert-base-uncased's well-known ids
    assert tok(["A photo of a dog."]).numpy()[0, :8].tolist() == [101, 1037, 6302, 1997, 1037, 3899, 1012, 0]


def test_get_tokenizer_follows_the_config():
    clipa = get_tokenizer("ViT-L-14-CLIPA", vocab_file=VOCAB)
    assert isinstance(clipa, BertTokenizer)
    assert (clipa.context_length, clipa.strip_sep_token, clipa.add_sep_token) == (32, True, True)
    assert clipa(["a dog"]).numpy().tolist() == [[CLS, 48, 118] + [PAD] * 29]
    bigvision = get_tokenizer("ViT-H-14-CL32-GAP-BigVision", vocab_file=VOCAB)
    assert (bigvision.context_length, bigvision.add_sep_token, bigvision.clean) == (32, False, "none")
    long_text = " ".join(["dog"] * 40)
    assert bigvision.batch_encode(long_text)[0].tolist() == [CLS] + [118] * 31
    assert clipa.batch_encode(long_text)[0].tolist() == [CLS] + [118] * 30 + [PAD]
    assert get_tokenizer("ViT-L-14-CLIPA", context_length=8, vocab_file=VOCAB).context_length == 8
    # OpenAI BPE models are unaffected
    assert type(get_tokenizer("ViT-B-32")).__name__ == "SimpleTokenizer"


# ---------------------------------------------------------------------------------------------- models
# The CLIPA repository's names; open_clip's CLIPA configs are checked against open_clip 3.3.0 copies.
BIGVISION = ["ViT-H-14-CL32-GAP-BigVision", "ViT-L-14-CL32-GAP-BigVision"]


def test_bigvision_configs_and_parameter_counts():
    expected = {
        # same architecture as open_clip's *-CLIPA configs (which count the same); only the GELU differs
        "ViT-H-14-CL32-GAP-BigVision": 968_235_009,
        "ViT-L-14-CL32-GAP-BigVision": 414_210_561,
        "ViT-H-14-CLIPA": 968_235_009,
        "ViT-L-14-CLIPA": 414_210_561,
    }
    for name, count in expected.items():
        with paddle.LazyGuard():
            model = create_model(name)
        assert sum(int(np.prod(p.shape)) for p in model.parameters()) == count, name
    for name in BIGVISION:
        cfg = get_model_config(name)
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        assert v["no_ln_pre"] and v["final_ln_after_pool"] and v["pool_type"] == "avg"
        assert v["act_kwargs"] == t["act_kwargs"] == {"approximate": "tanh"}
        assert t["pool_type"] == "last" and t["no_causal_mask"] and t["context_length"] == 32
        assert cfg["preprocess_cfg"] == {
            "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "resize_mode": "squash"}


def test_seed_call_builds_336_model_with_imagenet_bilinear_squash():
    with paddle.LazyGuard():
        model, _, preprocess = create_model_and_transforms(
            "ViT-H-14-CL32-GAP-BigVision",
            pretrained=None,
            force_image_size=336,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            interpolation="bilinear",
            square_resize_only=True,
        )
    assert model.visual.image_size == (336, 336) and model.visual.grid_size == (24, 24)
    assert list(model.visual.positional_embedding.shape) == [24 * 24 + 1, 1280]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    got = preprocess(image).numpy()
    # squash (no crop) with bilinear resampling, then ImageNet normalisation
    ref = np.asarray(image.resize((336, 336), Image.BILINEAR), dtype=np.float32) / 255.0
    ref = ((ref - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    assert got.shape == (3, 336, 336)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def _tiny_bigvision_cfg(image_size: int = 32) -> dict:
    """The registered BigVision config with every switch kept and only the sizes shrunk."""
    cfg = get_model_config("ViT-H-14-CL32-GAP-BigVision")
    cfg["embed_dim"] = 32
    cfg["vision_cfg"].update(image_size=image_size, layers=2, width=64, head_width=32, patch_size=8)
    cfg["text_cfg"].update(context_length=12, vocab_size=160, width=64, heads=2, layers=2)
    return cfg


def _clipa_torch_state_dict(cfg: dict, seed: int) -> dict:
    """Random weights in the layout the CLIPA repository's PyTorch port saves (open_clip's CLIP)."""
    rng = np.random.default_rng(seed)
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    W, p, n = v["width"], v["patch_size"], (v["image_size"] // v["patch_size"]) ** 2

    def mat(*shape, std=0.02):
        return rng.normal(0, std, shape).astype(np.float32)

    def vec(k, around=0.0):
        return (around + rng.normal(0, 0.05, k)).astype(np.float32)

    def blocks(prefix, width, layers):
        # c_fc is drawn wider than the rest so that GELU inputs are O(1), where tanh and erf differ
        out = {}
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            out.update({
                b + "ln_1.weight": vec(width, 1.0), b + "ln_1.bias": vec(width),
                b + "attn.in_proj_weight": mat(3 * width, width), b + "attn.in_proj_bias": vec(3 * width),
                b + "attn.out_proj.weight": mat(width, width), b + "attn.out_proj.bias": vec(width),
                b + "ln_2.weight": vec(width, 1.0), b + "ln_2.bias": vec(width),
                b + "mlp.c_fc.weight": mat(4 * width, width, std=0.25), b + "mlp.c_fc.bias": vec(4 * width),
                b + "mlp.c_proj.weight": mat(width, 4 * width), b + "mlp.c_proj.bias": vec(width),
            })
        return out

    sd = {
        "visual.conv1.weight": mat(W, 3, p, p),
        "visual.class_embedding": vec(W),
        "visual.positional_embedding": mat(n + 1, W),
        "visual.ln_post.weight": vec(W, 1.0), "visual.ln_post.bias": vec(W),
        "visual.proj": mat(W, e),
        "token_embedding.weight": mat(t["vocab_size"], t["width"]),
        "positional_embedding": mat(t["context_length"], t["width"]),
        "ln_final.weight": vec(t["width"], 1.0), "ln_final.bias": vec(t["width"]),
        "text_projection": mat(t["width"], e),
        "logit_scale": np.array(np.log(1 / 0.07), np.float32),
    }
    sd.update(blocks("visual.", W, v["layers"]))
    sd.update(blocks("", t["width"], t["layers"]))
    return sd


# A float64 numpy forward written from the CLIPA PyTorch port's definition (pool_style big_vision_gap /
# big_vision_last, ln_pre off, attention_mask off, GELU approximate='tanh'), independent of paddlemix.
def _ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _resblocks(x, sd, prefix, layers, heads):
    L, W = x.shape
    d = W // heads
    for i in range(layers):
        g = {k[len(f"{prefix}transformer.resblocks.{i}."):]: v.astype(np.float64)
             for k, v in sd.items() if k.startswith(f"{prefix}transformer.resblocks.{i}.")}
        h = _ln(x, g["ln_1.weight"], g["ln_1.bias"]) @ g["attn.in_proj_weight"].T + g["attn.in_proj_bias"]
        q, k, v = (a.reshape(L, heads, d).transpose(1, 0, 2) for a in np.split(h, 3, axis=-1))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(L, W)
        x = x + o @ g["attn.out_proj.weight"].T + g["attn.out_proj.bias"]
        h = _gelu_tanh(_ln(x, g["ln_2.weight"], g["ln_2.bias"]) @ g["mlp.c_fc.weight"].T + g["mlp.c_fc.bias"])
        x = x + h @ g["mlp.c_proj.weight"].T + g["mlp.c_proj.bias"]
    return x


def _reference_features(sd, cfg, image, text):
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    p, g = v["patch_size"], v["image_size"] // v["patch_size"]
    img_out = []
    for im in image.astype(np.float64):
        patches = im.reshape(3, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, -1)
        x = patches @ sd["visual.conv1.weight"].reshape(v["width"], -1).T
        x = np.concatenate([sd["visual.class_embedding"][None], x]) + sd["visual.positional_embedding"]
        x = _resblocks(x, sd, "visual.", v["layers"], v["width"] // v["head_width"])
        pooled = _ln(x[1:].mean(0), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        img_out.append(pooled @ sd["visual.proj"])
    txt_out = []
    for ids in text:
        x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
        x = _ln(_resblocks(x, sd, "", t["layers"], t["heads"]), sd["ln_final.weight"], sd["ln_final.bias"])
        txt_out.append(x[-1] @ sd["text_projection"])
    return np.stack(img_out), np.stack(txt_out)


def test_tiny_bigvision_checkpoint_loads_and_matches_reference_forward(tmp_path):
    cfg = _tiny_bigvision_cfg()
    cfg_path = tmp_path / "tiny-bigvision.json"
    cfg_path.write_text(json.dumps(cfg))
    sd = _clipa_torch_state_dict(cfg, seed=0)
    ckpt = tmp_path / "tiny.safetensors"
    save_safetensors(sd, ckpt)
    model = create_model(cfg_path, pretrained=ckpt)
    tokenizer = get_tokenizer(cfg_path, vocab_file=VOCAB)
    text = tokenizer(["a photo of a dog", "a red car", "中文 big"]).numpy()
    assert text[0].tolist() == [CLS, 48, 117, 112, 48, 118] + [PAD] * 6  # no [SEP]: BigVision layout
    image = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with paddle.no_grad():
        img = model.encode_image(paddle.to_tensor(image)).numpy()
        txt = model.encode_text(paddle.to_tensor(text)).numpy()
    ref_img, ref_txt = _reference_features(sd, cfg, image, text)
    assert np.abs(img - ref_img).max() < 1e-6
    assert np.abs(txt - ref_txt).max() < 1e-6
    # the tanh GELU is the one built, and it matters: the exact GELU gives other features
    x = paddle.linspace(-4, 4, 81)
    for act in (model.visual.transformer.blocks[0].mlp.act, model.text.transformer.blocks[1].mlp.act):
        np.testing.assert_allclose(act(x).numpy(), _gelu_tanh(x.numpy().astype(np.float64)), atol=1e-6)
    exact = json.loads(json.dumps(cfg))
    del exact["vision_cfg"]["act_kwargs"], exact["text_cfg"]["act_kwargs"]
    exact_path = tmp_path / "exact.json"
    exact_path.write_text(json.dumps(exact))
    with paddle.no_grad():
        img_exact = create_model(exact_path, pretrained=ckpt).encode_image(paddle.to_tensor(image)).numpy()
    assert np.abs(img_exact - ref_img).max() > 1e-5  # the match above is ~1e-7


def test_act_kwargs_validation(tmp_path):
    cfg = _tiny_bigvision_cfg()
    cfg["vision_cfg"]["act_kwargs"] = {"approximate": "sigmoid"}
    with pytest.raises(paddlemix.models.ConfigError, match="sigmoid"):
        paddlemix.models.CLIP(paddlemix.models.CLIPConfig.from_model_cfg(cfg))
    cfg["vision_cfg"]["act_kwargs"] = {"approximate": "tanh", "inplace": True}
    with pytest.raises(paddlemix.models.ConfigError, match="inplace"):
        paddlemix.models.CLIP(paddlemix.models.CLIPConfig.from_model_cfg(cfg))


def test_position_embedding_resized_for_higher_resolution_fine_tuning(tmp_path):
    """CLIPA pre-trains at low resolution and fine-tunes higher: the 4x4 table becomes 6x6."""
    cfg = _tiny_bigvision_cfg(image_size=32)
    sd = _clipa_torch_state_dict(cfg, seed=2)
    pos = sd["visual.positional_embedding"]
    pos[1:] = np.tile(np.linspace(-1, 1, 64, dtype=np.float32), (16, 1))  # constant over the grid
    ckpt = tmp_path / "low_res.safetensors"
    save_safetensors(sd, ckpt)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    model = create_model(cfg_path, pretrained=ckpt, force_image_size=48)
    table = model.visual.positional_embedding.numpy()
    assert table.shape == (37, 64)
    np.testing.assert_array_equal(table[0], pos[0])  # the class row is kept as is
    np.testing.assert_allclose(table[1:], np.tile(pos[1], (36, 1)), atol=1e-6)  # constant stays constant
    np.testing.assert_array_equal(table, resize_pos_embed(pos, (6, 6)))
    with paddle.no_grad():
        out = model.encode_image(paddle.randn([1, 3, 48, 48]))
    assert list(out.shape) == [1, 32]


# ---------------------------------------------------------------------------------------------- token reduction
from paddlemix.data.token_reduction import (  # noqa: E402
    HeuristicPosTagger,
    ImageResolutionReducer,
    TextTokenReducer,
    resize_images,
    syntax_keep_words,
)
from paddlemix.data.tokenizer import SimpleTokenizer  # noqa: E402

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "area": Image.BOX}


@pytest.mark.parametrize("mode", sorted(_PIL_FILTERS))
def test_image_resolution_reduction_equals_pil_resampling(mode):
    rng = np.random.default_rng(0)
    batch = rng.random((2, 3, 56, 40)).astype(np.float32)
    for size in [(28, 20), (21, 15), (16, 16), (70, 50)]:  # 2x, non-integer, anisotropic, upsampling
        got = resize_images(batch, size, mode)
        ref = np.stack([[np.asarray(Image.fromarray(ch, mode="F").resize(size[::-1], _PIL_FILTERS[mode]))
                         for ch in img] for img in batch])
        assert got.shape == (2, 3) + size and got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-6, (mode, size)
        # the Paddle path (on device, differentiable) computes the same
        np.testing.assert_allclose(resize_images(paddle.to_tensor(batch), size, mode).numpy(), got, atol=1e-6)


def test_area_reduction_averages_pixel_blocks():
    x = np.arange(2 * 3 * 224 * 224, dtype=np.float32).reshape(2, 3, 224, 224) % 251
    reducer = ImageResolutionReducer(112, mode="area")
    expected = x.reshape(2, 3, 112, 2, 112, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(reducer(x), expected, rtol=1e-5, atol=1e-4)
    assert ImageResolutionReducer(84)(paddle.to_tensor(x)).shape == [2, 3, 84, 84]
    with pytest.raises(ValueError, match="nearest"):
        ImageResolutionReducer(64, mode="nearest")


def test_random_patch_masking_keeps_half_the_patches_in_training(tmp_path):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(_tiny_bigvision_cfg()))
    model = create_model(cfg_path, force_patch_dropout=0.5)
    image = paddle.randn([3, 3, 32, 32])
    model.train()
    tokens, keep = model.visual.embed(image)
    assert list(tokens.shape) == [3, 1 + 8, 64] and list(keep.shape) == [3, 8]  # class token + 8 of 16
    assert all(len(set(row)) == 8 for row in keep.numpy().tolist())
    model.eval()
    tokens, keep = model.visual.embed(image)
    assert list(tokens.shape) == [3, 17, 64] and keep is None


CAPTIONS = [
    "a photo of a big brown dog running on the green grass",
    "a red car",
    "two men ride horses under a tall tree near the old house",
]


def _bpe():
    return SimpleTokenizer(context_length=77)


@pytest.mark.parametrize("length", [8, 16, 32])
def test_truncation_equals_the_tokenizer(length):
    bpe = _bpe()
    np.testing.assert_array_equal(TextTokenReducer(bpe, length).batch_encode(CAPTIONS),
                                  bpe.batch_encode(CAPTIONS, context_length=length))
    for kwargs in ({}, {"strip_sep_token": True}, {"add_sep_token": False}):
        bert = BertTokenizer(VOCAB, context_length=32, **kwargs)
        np.testing.assert_array_equal(TextTokenReducer(bert, length).batch_encode(CAPTIONS),
                                      bert.batch_encode(CAPTIONS, context_length=length))


def test_random_and_block_masking_keep_framed_subsequences():
    bpe = _bpe()
    full = bpe.encode(CAPTIONS[2])  # 13 tokens
    sot, eot = bpe.sot_token_id, bpe.eot_token_id
    for strategy in ("random", "block"):
        reducer = TextTokenReducer(bpe, 8, strategy=strategy, seed=0)
        seen = set()
        for _ in range(200):
            row = reducer.batch_encode(CAPTIONS[2])[0].tolist()
            assert row[0] == sot and row[7] == eot
            kept = row[1:7]
            # a subsequence of the caption's tokens, in order (positions strictly increase)
            pos, positions = -1, []
            for tok in kept:
                pos = full.index(tok, pos + 1)
                positions.append(pos)
            if strategy == "block":
                assert positions == list(range(positions[0], positions[0] + 6))
            seen.update(positions)
        assert seen == set(range(len(full)))  # every token gets its chance
        # short captions are kept whole, and a fixed seed gives a fixed stream
        assert reducer.batch_encode("a red car")[0].tolist() == bpe.batch_encode("a red car", 8)[0].tolist()
        a = TextTokenReducer(bpe, 8, strategy=strategy, seed=3).batch_encode(CAPTIONS * 4)
        b = TextTokenReducer(bpe, 8, strategy=strategy, seed=3).batch_encode(CAPTIONS * 4)
        np.testing.assert_array_equal(a, b)


def test_heuristic_pos_tags():
    words = "a photo of a big brown dog running on the green grass".split()
    assert [t for _, t in HeuristicPosTagger()(words)] == [
        "DT", "NN", "IN", "DT", "JJ", "JJ", "NN", "VBG", "IN", "DT", "JJ", "NN"]
    words = "two men ride horses to eat fresh apples slowly".split()
    assert [t for _, t in HeuristicPosTagger()(words)] == [  # irregular plurals stay NN: same rank
        "CD", "NN", "VB", "NNS", "TO", "VB", "JJ", "NNS", "RB"]


def test_syntax_masking_keeps_nouns_then_adjectives_then_verbs():
    text = CAPTIONS[0]
    assert syntax_keep_words(text, 6) == "photo big brown dog green grass"
    assert syntax_keep_words(text, 4) == "photo big dog grass"
    # then the verb, then the rest, earliest first
    assert syntax_keep_words(text, 8) == "a photo big brown dog running green grass"
    assert syntax_keep_words("a red car", 6) == "a red car"
    bpe = _bpe()
    got = TextTokenReducer(bpe, 8, strategy="syntax").batch_encode(text)
    np.testing.assert_array_equal(got, bpe.batch_encode("photo big brown dog green grass", 8))
    bert = BertTokenizer(VOCAB, context_length=32, strip_sep_token=True)
    got = TextTokenReducer(bert, 6, strategy="syntax").batch_encode(text)[0].tolist()
    assert got == [CLS, 117, 127, 118, 137, PAD]  # [CLS] photo big dog grass, [SEP] -> [PAD]
    # any tagger returning Penn tags plugs in (e.g. nltk.pos_tag where its data is installed)
    def verbs_first(words):
        return [(w, "NN" if w == "running" else "DT") for w in words]

    assert syntax_keep_words(text, 1, verbs_first) == "running"
    with pytest.raises(ValueError, match="tags for"):
        syntax_keep_words(text, 2, lambda words: ["NN"])
    with pytest.raises(ValueError, match="strategy"):
        TextTokenReducer(bpe, 8, strategy="shuffle")
