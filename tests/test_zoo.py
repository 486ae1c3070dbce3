"""The model zoo: registry facts, PaddleMIX's legacy Paddle files, and the download-convert-cache flow.

The flow tests serve a generated tiny zoo from a real HTTP server on 127.0.0.1
(tests/zoo_server.py): PaddleMIX-hosted files (its config schema, fp16/bf16 ``.pdparams`` with
its parameter names) and an open_clip release under an HF-hub-style path. The tiny weights are
the parity fixtures, so every loaded model is checked against numbers open_clip / EVA-CLIP
produced in torch. Download faults (resume, corruption, races) are covered in test_download.py.
"""
import importlib.util
import json
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import paddle
import pytest
from zoo_server import ZooServer

import paddlemix
from paddlemix import clip
from paddlemix.models import CLIP, CLIPConfig
from paddlemix.zoo import pretrained as zoo
from paddlemix.zoo.checkpoint import load_state_dict, safetensors_metadata
from paddlemix.zoo.key_maps import ConversionError, detect_layout
from paddlemix.zoo.download import DownloadError, file_sha256
from paddlemix.zoo.model_dir import manifest_problem
from paddlemix.zoo.legacy import legacy_config_to_model_cfg
from paddlemix.zoo.loading import WeightLoadError, load_tower
from paddlemix.zoo.registry import CONFIG_DIR, get_model_config
from paddlemix.zoo.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]
PARITY = Path(__file__).parent / "fixtures" / "parity"
CLIP_CASE, EVA_CASE = PARITY / "openai_quickgelu", PARITY / "eva02_rope_swiglu"

ISSUE_MODELS = [
    "CLIP-ViT-bigG-14-laion2B-39B-b160k", "CLIP-ViT-g-14-laion2B-s34B-b88K", "CLIP-ViT-H-14-laion2B-s32B-b79K",
    "CLIP-ViT-L-14-laion2B-s32B-b82K", "CLIP-ViT-B-16-laion2B-s34B-b88K", "CLIP-ViT-B-32-laion2B-s34B-b79K",
    "CLIP-ViT-L-14-DataComp.XL-s13B-b90K", "CLIP-ViT-B-16-DataComp.XL-s13B-b90K",
    "CLIP-ViT-B-32-DataComp.XL-s13B-b90K", "CLIP-ViT-B-32-256x256-DataComp-s34B-b86K",
    "DFN5B-CLIP-ViT-H-14-378", "DFN5B-CLIP-ViT-H-14", "DFN2B-CLIP-ViT-L-14", "DFN2B-CLIP-ViT-B-16",
    "EVA01-CLIP-g-14", "EVA01-CLIP-g-14-plus", "EVA02-CLIP-B-16", "EVA02-CLIP-L-14", "EVA02-CLIP-L-14-336",
    "EVA02-CLIP-bigE-14", "EVA02-CLIP-bigE-14-plus", "EVA-CLIP-8B", "EVA-CLIP-8B-448", "EVA-CLIP-18B",
    "ViT-L-14-CLIPA-datacomp1B", "ViT-L-14-CLIPA-336-datacomp1B", "ViT-H-14-CLIPA-datacomp1B",
    "ViT-H-14-CLIPA-336-datacomp1B", "ViT-H-14-CLIPA-336-laion2B", "ViT-bigG-14-CLIPA-datacomp1B",
    "ViT-bigG-14-CLIPA-336-datacomp1B",
]
OPENAI_MODELS = ["CLIP-ViT-B-32-openai", "CLIP-ViT-B-16-openai", "CLIP-ViT-L-14-openai", "CLIP-ViT-L-14-336-openai"]
REGISTRY = zoo.default_registry()


# --------------------------------------------------------------------------- tiny-zoo helpers


def _linear(key: str) -> bool:
    """Keys of torch nn.Linear weights, which PaddleMIX stores transposed ([in, out])."""
    return key.endswith(".weight") and any(
        part in key for part in ("out_proj.", "c_fc.", "c_proj.", "attn.proj.", "mlp.fc1.", "mlp.fc2.", "mlp.w1.",
                                 "mlp.w2.", "mlp.w3.", "visual.head.", "_proj.weight")
    )


def to_paddlemix_legacy(sd):
    """A torch open_clip / EVA-CLIP state dict renamed the way PaddleMIX's Paddle models name it.

    Written from PaddleMIX's module structure (separate q/k/v projections, q/v biases on the
    projections, [in, out] linear weights), independently of the converter under test.
    """
    out = {}
    for key, value in sd.items():
        value = np.asarray(value, np.float32)
        if key.endswith(("attn.in_proj_weight", "attn.qkv.weight")):
            base = key.rsplit(".", 1)[0] if key.endswith("qkv.weight") else key[: -len("in_proj_weight")].rstrip(".")
            base = base[: -len(".qkv")] if base.endswith(".qkv") else base
            for name, part in zip("qkv", np.split(value, 3)):
                out[f"{base}.{name}_proj.weight"] = np.ascontiguousarray(part.T)
        elif key.endswith("attn.in_proj_bias"):
            for name, part in zip("qkv", np.split(value, 3)):
                out[f"{key[: -len('in_proj_bias')]}{name}_proj.bias"] = part
        elif key.endswith(("attn.q_bias", "attn.v_bias")):
            out[key.replace("_bias", "_proj.bias")] = value
        elif key == "logit_scale":
            out[key] = value.reshape([1])
        elif _linear(key):
            out[key] = np.ascontiguousarray(value.T)
        else:
            out[key] = value
    return out


def save_pdparams(sd, path, dtype="float32"):
    """Write with paddle.save, as PaddleMIX's save_pretrained does (bf16 becomes uint16 bits)."""
    paddle.save({k: paddle.to_tensor(v).astype(dtype) for k, v in sd.items()}, str(path))
    return path


def case_cfg(case: Path) -> dict:
    return json.loads((case / "model_config.json").read_text())


def paddlemix_config(case: Path) -> dict:
    """The config.json PaddleMIX's CLIPConfig / EVACLIPConfig would write for a parity case."""
    cfg = case_cfg(case)
    vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
    text = {"context_length": tc["context_length"], "vocab_size": tc["vocab_size"], "width": tc["width"],
            "heads": tc["heads"], "layers": tc["layers"], "ls_init_value": None, "embed_dim": cfg["embed_dim"],
            "xattn": False, "attn_mask": True, "pad_id": 0, "embed_cls": False, "output_tokens": False,
            "quick_gelu": cfg.get("quick_gelu", False), "mlp_ratio": 4.0, "fusedLN": False, "fusedlinear": False,
            "flash_attn": False}
    common = {"image_size": vc["image_size"], "patch_size": vc["patch_size"], "width": vc["width"],
              "layers": vc["layers"], "head_width": vc["head_width"], "mlp_ratio": vc.get("mlp_ratio", 4.0),
              "embed_dim": cfg["embed_dim"], "xattn": False, "fusedlinear": False, "flash_attn": False}
    if "eva_model_name" in vc:
        vision = dict(common, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                      init_values=None, patch_dropout=0.0, use_abs_pos_emb=True, use_rel_pos_bias=False,
                      use_shared_rel_pos_bias=False, rope=vc.get("rope", False), use_mean_pooling=False,
                      attentional_pool=False, pt_hw_seq_len=vc.get("pt_hw_seq_len", 16),
                      intp_freq=vc.get("intp_freq", False), naiveswiglu=vc.get("naiveswiglu", False),
                      subln=vc.get("subln", False), inner_attn_ln=True, postnorm=False, fusedLN=False)
        model_type = "evaclip"
    else:
        vision = dict(common, ls_init_value=None, patch_dropout=0.0, global_average_pool=False,
                      attentional_pool=False, n_queries=256, attn_pooler_heads=8, output_tokens=False)
        model_type = "clip"
    raw = {"model_type": model_type, "vision_cfg": vision, "text_cfg": text, "vision_config": vision,
           "text_config": text, "return_dict": True}
    if model_type == "clip":
        raw["custom_text"] = False
    return raw


def features(model, case: Path):
    inputs = np.load(case / "inputs.npz")
    with paddle.no_grad():
        return (model.encode_image(paddle.to_tensor(inputs["image"])).astype("float32").numpy(),
                model.encode_text(paddle.to_tensor(inputs["text"])).astype("float32").numpy())


def assert_reference(model, case: Path, atol=1e-4):
    expected = np.load(case / "outputs.npz")
    image, text = features(model, case)
    np.testing.assert_allclose(image, expected["image_features"], rtol=0, atol=atol)
    np.testing.assert_allclose(text, expected["text_features"], rtol=0, atol=atol)


def rounded_reference(case: Path, dtype: str):
    """The case's model with every weight rounded through ``dtype``: what a half-precision zoo file holds."""
    model = paddlemix.create_model(case / "model_config.json", pretrained=case / "model.safetensors")
    for p in model.parameters():
        p.set_value(p.astype(dtype).astype("float32"))
    return model


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("PADDLEMIX_HOME", str(root))
    for var in ("PADDLEMIX_OFFLINE", "PADDLEMIX_MODEL_HOST", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return root


@pytest.fixture(scope="module")
def hosted_files(tmp_path_factory):
    """Bytes of the tiny zoo's files: PaddleMIX's (fp16 CLIP, bf16 EVA) and the open_clip release."""
    tmp = tmp_path_factory.mktemp("hosted")
    clip_legacy = to_paddlemix_legacy(load_state_dict(CLIP_CASE / "model.safetensors"))
    eva_legacy = to_paddlemix_legacy(load_state_dict(EVA_CASE / "model.safetensors"))
    return {
        "clip/config.json": json.dumps(paddlemix_config(CLIP_CASE)).encode(),
        "clip/model_state.pdparams": save_pdparams(clip_legacy, tmp / "c.pdparams", "float16").read_bytes(),
        "eva/config.json": json.dumps(paddlemix_config(EVA_CASE)).encode(),
        "eva/model_state.pdparams": save_pdparams(eva_legacy, tmp / "e.pdparams", "bfloat16").read_bytes(),
        "open_clip.bin": (CLIP_CASE / "pytorch_model.bin").read_bytes(),
    }


TINY = {"name": "tiny-CLIP-laion", "family": "test", "arch": "tiny-ViT-quickgelu", "tag": "tiny_laion", "image_size": 32,
        "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                       "resize_mode": "shortest"}, "params_m": 0.24, "dtype": "fp16",
        "paddlemix": "paddlemix/CLIP/tiny-CLIP-laion",
        "hf": {"repo": "laion/tiny-CLIP", "file": "open_clip_pytorch_model.bin", "layout": "open_clip"}}
TINY_EVA = {"name": "tiny-EVA02-CLIP", "family": "test", "arch": "tiny-EVA02", "tag": "tiny_merged", "image_size": 32,
            "preprocess": "openai", "dtype": "bf16", "paddlemix": "paddlemix/EVA/tiny-EVA02-CLIP",
            "tag_aliases": ["eva_clip"]}
HF_PATH = "laion/tiny-CLIP/resolve/main/open_clip_pytorch_model.bin"


def served(files, paddlemix=True, hf=True):
    out = {}
    if paddlemix:
        out.update({f"{TINY['paddlemix']}/{n}": files[f"clip/{n}"] for n in zoo.PADDLEMIX_FILES})
        out.update({f"{TINY_EVA['paddlemix']}/{n}": files[f"eva/{n}"] for n in zoo.PADDLEMIX_FILES})
    if hf:
        out[HF_PATH] = files["open_clip.bin"]
    return out


@pytest.fixture
def tiny_entries():
    presets = json.loads(zoo.REGISTRY_FILE.read_text())["preprocess"]
    added = [zoo.register_pretrained(zoo.PretrainedEntry.from_dict(dict(d, model_cfg=case_cfg(c)), presets))
             for d, c in ((TINY, CLIP_CASE), (TINY_EVA, EVA_CASE))]
    yield added
    for entry in added:
        zoo.unregister_pretrained(entry.name)


@pytest.fixture
def server(home, hosted_files, tiny_entries, monkeypatch):
    with ZooServer(served(hosted_files)) as zoo_server:
        monkeypatch.setenv("PADDLEMIX_MODEL_HOST", zoo_server.base_url)
        monkeypatch.setenv("HF_ENDPOINT", zoo_server.base_url)
        yield zoo_server


# ------------------------------------------------------------------------------------ registry


def test_registry_has_every_model_of_the_issue_with_its_facts():
    names = [e.name for e in REGISTRY]
    assert sorted(names) == sorted(ISSUE_MODELS + OPENAI_MODELS)
    assert len(REGISTRY) == 35
    for e in REGISTRY:
        assert e.params_m is not None and e.params_m > 100, e.name
        assert e.image_size in (224, 256, 336, 378, 448), e.name
        assert set(e.preprocess) == {"mean", "std", "interpolation", "resize_mode"}, e.name
        assert e.hf is not None and e.hf.file, e.name
        assert e.dtype in ("fp16", "bf16"), e.name
    hosted = {e.name: e.paddlemix for e in REGISTRY if e.paddlemix}
    assert len(hosted) == 21  # PaddleMIX hosts LAION, DataComp, DFN and EVA01/EVA02
    assert hosted["CLIP-ViT-L-14-laion2B-s32B-b82K"] == "paddlemix/CLIP/CLIP-ViT-L-14-laion2B-s32B-b82K"
    assert hosted["EVA02-CLIP-L-14"] == "paddlemix/EVA/EVA02-CLIP-L-14"
    assert REGISTRY.get("CLIP-ViT-B-32-laion2B-s34B-b79K").hf == zoo.HFSource(
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_pytorch_model.bin", "open_clip")
    top1 = {e.name: e.in1k_top1 for e in REGISTRY}
    assert (top1["CLIP-ViT-bigG-14-laion2B-39B-b160k"], top1["DFN5B-CLIP-ViT-H-14-378"]) == (80.09, 84.37)
    assert [n for n, t in top1.items() if t is None] == ["EVA-CLIP-8B", "EVA-CLIP-8B-448"]


def test_list_pretrained_pairs_like_open_clip():
    pairs = paddlemix.zoo.pretrained.list_pretrained()
    assert len(pairs) == len(set(pairs)) == 35
    for pair in [("ViT-B-32", "laion2b_s34b_b79k"), ("ViT-H-14-378-quickgelu", "dfn5b"), ("ViT-B-32-quickgelu", "openai"),
                 ("ViT-bigG-14-CLIPA-336", "datacomp1b"), ("EVA02-CLIP-L-14", "merged2b_s4b_b131k"),
                 ("EVA-CLIP-18B", "eva_clip")]:
        assert pair in pairs
    assert "ViT-L-14:laion2b_s32b_b82k" in zoo.list_pretrained(as_str=True)
    assert zoo.list_pretrained_tags("ViT-L-14") == ["laion2b_s32b_b82k", "datacomp_xl_s13b_b90k"]


def test_quickgelu_and_preprocessing_follow_the_releases():
    """DFN and OpenAI weights were trained with QuickGELU; the others with GELU (open_clip's pretrained table)."""
    for e in REGISTRY:
        if e.family in ("DFN", "OpenAI"):
            assert get_model_config(e.arch)["quick_gelu"] is True, e.name
        elif e.family in ("LAION-2B", "DataComp", "CLIPA-v2"):
            assert get_model_config(e.arch).get("quick_gelu", False) is False, e.name
    get = REGISTRY.get
    assert get("CLIP-ViT-L-14-laion2B-s32B-b82K").preprocess_cfg() == {
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "shortest"}
    assert get("DFN5B-CLIP-ViT-H-14-378").preprocess["resize_mode"] == "squash"
    assert get("DFN2B-CLIP-ViT-L-14").preprocess["resize_mode"] == "shortest"
    clipa = get("ViT-H-14-CLIPA-336-laion2B").preprocess
    assert (clipa["mean"], clipa["interpolation"], clipa["resize_mode"]) == ([0.485, 0.456, 0.406], "bilinear", "squash")
    for e in REGISTRY:  # the size the registry states is the one the architecture builds
        size = get_model_config(e.arch)["vision_cfg"]["image_size"]
        assert (size, size) == (e.image_size, e.image_size) or size == [e.image_size] * 2, e.name


def test_lookup_by_every_spelling_and_helpful_errors():
    entry = REGISTRY.get("CLIP-ViT-L-14-laion2B-s32B-b82K")
    for spelling in ("paddlemix/CLIP/CLIP-ViT-L-14-laion2B-s32B-b82K", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
                     "hf-hub:laion/CLIP-ViT-L-14-laion2B-s32B-b82K"):
        assert REGISTRY.get(spelling) is entry
    assert REGISTRY.get("ViT-L/14", "laion2b-s32b-b82k") is entry
    assert REGISTRY.get("EVA02-CLIP-L-14", "eva_clip").name == "EVA02-CLIP-L-14"  # EVA-CLIP's own tag
    assert REGISTRY.find("QuanSun/EVA-CLIP") is None  # one repo for seven models names none of them
    with pytest.raises(zoo.UnknownPretrainedError, match=r"Did you mean \['CLIP-ViT-L-14-laion2B-s32B-b82K'"):
        REGISTRY.get("CLIP-ViT-L-14-laion2B-s32B-b82k")
    with pytest.raises(zoo.UnknownPretrainedError, match="exists for 'ViT-H-14-quickgelu'"):
        paddlemix.create_model("ViT-H-14", pretrained="dfn5b")
    with pytest.raises(zoo.UnknownPretrainedError, match=r"registered tags for 'ViT-B-32': \['laion2b_s34b_b79k'"):
        paddlemix.create_model("ViT-B-32", pretrained="laion2b")
    with pytest.raises(FileNotFoundError, match="neither a local model directory nor a zoo name"):
        CLIP.from_pretrained("DFN5B-CLIP-ViT-H-14-379")
    with pytest.raises(ValueError, match="already registered as 'CLIP-ViT-B-32-openai'"):
        REGISTRY.add(zoo.PretrainedEntry.from_dict(dict(TINY, arch="ViT-B-32-quickgelu", tag="openai")))


def _arch_params():
    """Every architecture the registry uses whose config exists, with the counts its entries state.

    A '-quickgelu' twin differs only in its activation, which has no parameters, so the pair is
    built once (under the plain name); each test takes a couple of seconds for the big towers.
    """
    out = {}
    for e in REGISTRY:
        if (CONFIG_DIR / f"{e.arch}.json").is_file():
            plain = e.arch[: -len("-quickgelu")] if e.arch.endswith("-quickgelu") else e.arch
            arch = plain if (CONFIG_DIR / f"{plain}.json").is_file() else e.arch
            out.setdefault(arch, set()).add(e.params_m)
    return sorted(out.items())


def test_every_registry_architecture_is_available():
    missing = sorted(e.arch for e in REGISTRY if not (CONFIG_DIR / f"{e.arch}.json").is_file())
    assert missing == [], f"registry entries without an architecture config: {missing}"
    for e in REGISTRY:
        if e.arch.endswith("-quickgelu"):
            quick, plain = get_model_config(e.arch), get_model_config(e.arch[: -len("-quickgelu")])
            assert quick.pop("quick_gelu") is True and plain.pop("quick_gelu", False) is False, e.arch
            assert quick == plain, e.arch


@pytest.mark.parametrize("arch,stated", _arch_params(), ids=[a for a, _ in _arch_params()])
def test_parameter_count_under_lazy_guard_matches_the_tables(arch, stated):
    with paddle.LazyGuard():
        model = CLIP(CLIPConfig.from_model_cfg(get_model_config(arch)))
    count = sum(int(np.prod(p.shape)) for p in model.parameters())
    assert {round(count / 1e6, 2)} == stated
    if arch == "ViT-bigG-14":
        assert round(count / 1e6, 2) == 2539.57
    if arch == "ViT-H-14-378":  # DFN5B-CLIP-ViT-H-14-378's tower
        assert round(count / 1e6, 2) == 986.71


def test_readme_table_is_generated_from_the_registry():
    spec = importlib.util.spec_from_file_location("gen_model_table", ROOT / "tools" / "gen_model_table.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    readme = (ROOT / "README.md").read_text()
    table = gen.render(json.loads(zoo.REGISTRY_FILE.read_text()))
    assert gen.updated_readme(readme, table) == readme, "run python tools/gen_model_table.py"
    assert table.count("\n| `") == 35
    assert "| `DFN5B-CLIP-ViT-H-14-378` [1] | `ViT-H-14-378-quickgelu` | `dfn5b` | 986.71 | 84.37 | 378 |" in table


# ------------------------------------------------------------------- PaddleMIX's legacy layout


@pytest.mark.parametrize("case", ["openai_quickgelu", "eva02_rope_swiglu", "eva01_g"])
def test_paddlemix_legacy_checkpoint_matches_the_torch_reference(case, tmp_path):
    case_dir = PARITY / case
    legacy = to_paddlemix_legacy(load_state_dict(case_dir / "model.safetensors"))
    assert detect_layout(legacy) == "paddlemix_legacy"
    weights = save_pdparams(legacy, tmp_path / "model_state.pdparams")
    assert_reference(paddlemix.create_model(case_dir / "model_config.json", pretrained=weights), case_dir)


def test_paddlemix_legacy_bf16_weights_are_widened_not_reinterpreted(tmp_path):
    """Paddle pickles bf16 as uint16 bits; read as integers they would give garbage features."""
    legacy = to_paddlemix_legacy(load_state_dict(EVA_CASE / "model.safetensors"))
    weights = save_pdparams(legacy, tmp_path / "model_state.pdparams", "bfloat16")
    assert load_state_dict(weights)["visual.cls_token"].dtype == np.uint16
    model = paddlemix.create_model(EVA_CASE / "model_config.json", pretrained=weights)
    for got, want in zip(features(model, EVA_CASE), features(rounded_reference(EVA_CASE, "bfloat16"), EVA_CASE)):
        np.testing.assert_array_equal(got, want)
    assert_reference(model, EVA_CASE, atol=0.05)


@pytest.mark.parametrize("case", ["clip_vit_quickgelu", "eva02_meanpool"])
def test_paddlemix_model_directory_loads_and_is_converted_once(case, home, tmp_path):
    """A directory PaddleMIX wrote gives PaddleMIX's numbers, converted into the cache once."""
    fixture = Path(__file__).parent / "fixtures" / "paddlemix_legacy" / case
    src = tmp_path / "paddlemix-dir"
    src.mkdir()
    for name in ("config.json", "model_state.pdparams"):
        shutil.copy(fixture / name, src / name)
    assert_reference(paddlemix.create_model(src), fixture)
    converted = resolve(src).weights
    assert converted.parent == home / "converted" / "local" and manifest_problem(converted, full=True) is None
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert_reference(CLIP.from_pretrained(str(src)), fixture)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again
    # New weights in the source directory are picked up.
    legacy = load_state_dict(fixture / "model_state.pdparams")
    legacy["logit_scale"] = legacy["logit_scale"] + 1
    save_pdparams(legacy, src / "model_state.pdparams")
    model = CLIP.from_pretrained(str(src))
    assert float(model.logit_scale) == pytest.approx(float(legacy["logit_scale"][0]), abs=1e-6)


def test_paddlemix_config_translation_refuses_unknown_switches():
    raw = paddlemix_config(EVA_CASE)
    raw["vision_cfg"]["use_rel_pos_bias"] = True
    with pytest.raises(ConversionError, match="use_rel_pos_bias=True"):
        legacy_config_to_model_cfg(raw)
    raw = paddlemix_config(CLIP_CASE)
    raw["text_cfg"]["rotary"] = 1
    with pytest.raises(ConversionError, match=r"keys this translation does not know: \['rotary'\]"):
        legacy_config_to_model_cfg(raw)
    hf_like = {"model_type": "clip", "vision_config": {"hidden_size": 64}}
    with pytest.raises(ConversionError, match="not a PaddleMIX config"):
        legacy_config_to_model_cfg(hf_like)


@pytest.mark.parametrize("case", [CLIP_CASE, EVA_CASE], ids=["clip", "evaclip"])
def test_split_tower_files_load_into_a_tower_alone(case, tmp_path):
    """PaddleMIX's model_state_vision / model_state_text.pdparams hold one tower, without the prefix."""
    legacy = to_paddlemix_legacy(load_state_dict(case / "model.safetensors"))
    vision = {k[len("visual."):]: v for k, v in legacy.items() if k.startswith("visual.")}
    text = {k[len("text."):] if k.startswith("text.") else k: v for k, v in legacy.items()
            if not k.startswith("visual.") and k != "logit_scale"}
    vision_file = save_pdparams(vision, tmp_path / "model_state_vision.pdparams")
    text_file = save_pdparams(text, tmp_path / "model_state_text.pdparams")
    model = paddlemix.create_model(case / "model_config.json")  # random weights
    expected = np.load(case / "outputs.npz")
    before = model.text.token_embedding.weight.numpy().copy()
    load_tower(model.visual, vision_file)
    np.testing.assert_array_equal(model.text.token_embedding.weight.numpy(), before)  # the other tower is untouched
    np.testing.assert_allclose(features(model, case)[0], expected["image_features"], rtol=0, atol=1e-4)
    load_tower(model.text, text_file)
    np.testing.assert_allclose(features(model, case)[1], expected["text_features"], rtol=0, atol=1e-4)
    # A whole-model checkpoint gives one tower too; a tower file for the other tower is refused by name.
    fresh = paddlemix.create_model(case / "model_config.json")
    load_tower(fresh.text, case / "pytorch_model.bin")
    np.testing.assert_allclose(features(fresh, case)[1], expected["text_features"], rtol=0, atol=1e-4)
    with pytest.raises(WeightLoadError, match=r"no conversion rule knows: \['visual.ln_final.bias'"):
        load_tower(fresh.visual, text_file)
    with pytest.raises(TypeError, match="VisionTransformer or TextTransformer"):
        load_tower(fresh, vision_file)


# ------------------------------------------------------------------------ the zoo over HTTP


def test_create_model_by_arch_and_tag_downloads_converts_then_works_offline(server, home, monkeypatch):
    model, _, preprocess = paddlemix.create_model_and_transforms("tiny-ViT-quickgelu", pretrained="tiny_laion")
    reference = features(rounded_reference(CLIP_CASE, "float16"), CLIP_CASE)
    for got, want in zip(features(model, CLIP_CASE), reference):
        np.testing.assert_array_equal(got, want)  # the fp16 zoo copy is exactly the rounded weights
    assert_reference(model, CLIP_CASE, atol=5e-3)
    assert paddlemix.get_model_preprocess_cfg(model)["mean"] == [0.5, 0.5, 0.5]  # the entry's, not OpenAI's
    assert [len(server.gets(f"{TINY['paddlemix']}/{n}")) for n in zoo.PADDLEMIX_FILES] == [1, 1]
    assert server.gets(HF_PATH) == []  # PaddleMIX's host is tried first
    out = home / "converted" / "tiny-CLIP-laion"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["layout"] == "paddlemix_legacy"
    assert manifest["source"]["source"] == "paddlemix"
    hosted = home / "models" / "paddlemix" / "CLIP" / "tiny-CLIP-laion" / "model_state.pdparams"
    assert manifest["source"]["sha256"] == file_sha256(hosted)
    for name, record in manifest["files"].items():
        assert record == {"sha256": file_sha256(out / name), "size": (out / name).stat().st_size}
    data = (out / "model.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    assert header["visual.class_embedding"]["dtype"] == "F16"
    assert safetensors_metadata(out / "model.safetensors")["dtype"] == "fp16"
    assert json.loads((out / "config.json").read_text())["preprocess_cfg"]["std"] == [0.5, 0.5, 0.5]

    server.stop()
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    for again in (paddlemix.create_model("tiny-ViT-quickgelu", pretrained="tiny_laion"),
                  CLIP.from_pretrained("tiny-CLIP-laion"),
                  CLIP.from_pretrained("paddlemix/CLIP/tiny-CLIP-laion"),
                  paddlemix.create_model("paddlemix/CLIP/tiny-CLIP-laion")):
        for got, want in zip(features(again, CLIP_CASE), reference):
            np.testing.assert_array_equal(got, want)


def test_eva_from_paddlemix_bf16_is_kept_bf16(server, home):
    model = CLIP.from_pretrained("paddlemix/EVA/tiny-EVA02-CLIP")
    for got, want in zip(features(model, EVA_CASE), features(rounded_reference(EVA_CASE, "bfloat16"), EVA_CASE)):
        np.testing.assert_array_equal(got, want)
    out = home / "converted" / "tiny-EVA02-CLIP"
    assert safetensors_metadata(out / "model.safetensors")["dtype"] == "bf16"
    assert resolve("tiny-EVA02", "eva_clip").weights == out  # EVA-CLIP's tag spelling


def test_offline_and_not_cached_names_every_file_looked_for(server, home, monkeypatch):
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        paddlemix.create_model("tiny-ViT-quickgelu", pretrained="tiny_laion")
    message = str(info.value)
    assert "could not get the weights of 'tiny-CLIP-laion'" in message
    assert str(home / "models" / "paddlemix" / "CLIP" / "tiny-CLIP-laion" / "config.json") in message
    assert str(home / "models" / "laion" / "tiny-CLIP" / "resolve" / "main" / "open_clip_pytorch_model.bin") in message
    assert "offline mode is on" in message
    assert [r for r in server.log] == []  # nothing touched the network
    assert not (home / "converted" / "tiny-CLIP-laion").exists()


def test_falls_back_to_the_hf_release_when_the_host_lacks_the_model(home, hosted_files, tiny_entries, monkeypatch):
    with ZooServer(served(hosted_files, paddlemix=False)) as zoo_server:
        monkeypatch.setenv("PADDLEMIX_MODEL_HOST", zoo_server.base_url)
        monkeypatch.setenv("HF_ENDPOINT", zoo_server.base_url)
        model = CLIP.from_pretrained("hf-hub:laion/tiny-CLIP")
        assert len(zoo_server.gets(HF_PATH)) == 1
        assert [r.status for r in zoo_server.log if r.path.startswith("paddlemix/")] == [404]
        with pytest.raises(DownloadError, match=r"\[paddlemix\].*HTTP 404"):
            zoo.resolve_pretrained("tiny-CLIP-laion", source="paddlemix", cache_dir=home / "other", progress=False)
    manifest = json.loads((home / "converted" / "tiny-CLIP-laion" / "manifest.json").read_text())
    assert (manifest["source"]["source"], manifest["layout"]) == ("hf", "open_clip")
    for got, want in zip(features(model, CLIP_CASE), features(rounded_reference(CLIP_CASE, "float16"), CLIP_CASE)):
        np.testing.assert_array_equal(got, want)


def test_hosted_config_of_another_architecture_is_refused(home, hosted_files, tiny_entries, monkeypatch):
    files = served(hosted_files)
    wrong = paddlemix_config(CLIP_CASE)
    wrong["vision_cfg"]["layers"] = 3
    files[f"{TINY['paddlemix']}/config.json"] = json.dumps(wrong).encode()
    with ZooServer(files) as zoo_server:
        with pytest.raises(ConversionError, match=r"vision_cfg.layers: hosted 3, registry 2"):
            zoo.resolve_pretrained("tiny-CLIP-laion", host=zoo_server.base_url, progress=False)
    assert not (home / "converted" / "tiny-CLIP-laion").exists()


def test_damaged_converted_copy_is_rebuilt_from_the_cached_download_offline(server, home, monkeypatch):
    out = zoo.resolve_pretrained("tiny-CLIP-laion", progress=False)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "manifest says" in manifest_problem(out)
    server.stop()
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    assert zoo.resolve_pretrained("tiny-CLIP-laion") == out
    assert manifest_problem(out, full=True) is None


def test_registry_sha256_rejects_a_file_that_is_not_the_published_one(home, hosted_files, monkeypatch):
    entry = zoo.PretrainedEntry.from_dict(dict(TINY, name="tiny-pinned", tag="pinned", hf=None,
                                               model_cfg=case_cfg(CLIP_CASE),
                                               sha256={"model_state.pdparams": "0" * 64}))
    with ZooServer({f"{TINY['paddlemix']}/{n}": hosted_files[f"clip/{n}"] for n in zoo.PADDLEMIX_FILES}) as srv:
        with pytest.raises(DownloadError, match="failed verification twice"):
            zoo.resolve_pretrained(entry, host=srv.base_url, progress=False)
    assert not (home / "converted" / "tiny-pinned").exists()


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"),
                                             ("amp", "float32")])
def test_loading_casts_to_the_requested_precision(server, precision, dtype):
    """fp16 zoo weights load into the precision asked for (CPU Paddle has no half convolutions,
    so half-precision models are checked by their weights; fp32 / amp also by their outputs)."""
    model = paddlemix.create_model("tiny-ViT-quickgelu", pretrained="tiny_laion", precision=precision)
    reference = rounded_reference(CLIP_CASE, "float16")
    assert {str(p.dtype).split(".")[-1] for p in model.parameters()} == {dtype}
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        np.testing.assert_array_equal(got.astype("float32").numpy(), want.astype(dtype).astype("float32").numpy(), name)
    if dtype == "float32":
        for got, want in zip(features(model, CLIP_CASE), features(reference, CLIP_CASE)):
            np.testing.assert_array_equal(got, want)


def test_download_pretrained_uses_clip_load_download_root(server, home, tmp_path):
    root = tmp_path / "download_root"
    out = zoo.download_pretrained("tiny-ViT-quickgelu", "tiny_laion", cache_dir=str(root))
    assert out == root / "converted" / "tiny-CLIP-laion" and manifest_problem(out) is None
    assert (root / "models" / "paddlemix" / "CLIP" / "tiny-CLIP-laion" / "model_state.pdparams").is_file()
    assert not (home / "converted").exists()


def test_concurrent_first_use_downloads_and_converts_once(server, home):
    results, errors = [], []

    def worker():
        try:
            results.append(zoo.resolve_pretrained("tiny-CLIP-laion", progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(set(results)) == 1 and len(results) == 3
    assert [len(server.gets(f"{TINY['paddlemix']}/{n}")) for n in zoo.PADDLEMIX_FILES] == [1, 1]
    assert manifest_problem(results[0], full=True) is None
    assert sorted(p.name for p in (home / "converted").iterdir()) == ["tiny-CLIP-laion", "tiny-CLIP-laion.lock"]


def test_clip_load_resolves_openai_names_through_the_registry(home, monkeypatch, tmp_path):
    """clip.load('ViT-B/32') asks the zoo for (ViT-B-32-quickgelu, openai) under its download_root."""
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        clip.load("ViT-B/32", download_root=str(tmp_path / "root"))
    message = str(info.value)
    assert "could not get the weights of 'CLIP-ViT-B-32-openai'" in message
    cached = tmp_path / "root" / "models" / "timm" / "vit_base_patch32_clip_224.openai" / "resolve" / "main"
    assert str(cached / "open_clip_pytorch_model.bin") in message
    # An architecture name alone builds the architecture; it never downloads (EVA names are both).
    assert (resolve("EVA02-CLIP-L-14").source, resolve("EVA02-CLIP-L-14").weights) == ("architecture", None)
