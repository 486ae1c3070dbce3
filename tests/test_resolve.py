"""The one name resolver (paddlemix.zoo.resolve): each prefix, each rule, their order, the errors,
and the config-schema markers (registry.config_kind), the ambiguous ``model_type: "clip"`` both ways.

Zoo entries are resolved offline: a tiny entry is registered and its converted directory written
into the cache beforehand, so a rule that would download finds it there (and offline mode proves
nothing reached the network).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddlemix
from paddlemix import PaddleMIXError
from paddlemix.models import CLIP, CLIPConfig
from paddlemix.models.config import ConfigError
from paddlemix.zoo import pretrained as zoo
from paddlemix.zoo.download import DownloadError
from paddlemix.zoo.model_dir import write_model_dir
from paddlemix.zoo.registry import UnknownModelError, config_kind, get_model_config
from paddlemix.zoo.resolve import Resolved, UnresolvedModelError, read_model_config, resolve

FIXTURES = Path(__file__).parent / "fixtures"
CLIP_CASE = FIXTURES / "parity" / "openai_quickgelu"
HF_DIR = FIXTURES / "parity" / "hf_clip"
LEGACY = FIXTURES / "paddlemix_legacy"
MEAN = [0.5, 0.25, 0.125]
ENTRY = {"name": "tiny-resolve-CLIP", "family": "test", "arch": "tiny-resolve-arch", "tag": "tiny_tag",
         "image_size": 32, "preprocess": {"mean": MEAN, "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                                          "resize_mode": "shortest"},
         "dtype": "fp32", "paddlemix": "paddlemix/CLIP/tiny-resolve-CLIP",
         "hf": {"repo": "laion/tiny-resolve", "file": "open_clip_pytorch_model.bin", "layout": "open_clip"}}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("PADDLEMIX_HOME", str(root))
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    return root


@pytest.fixture
def entry():
    added = zoo.register_pretrained(dict(ENTRY, model_cfg=_json(CLIP_CASE / "model_config.json")))
    yield added
    zoo.unregister_pretrained(added.name)


@pytest.fixture
def cached(home, entry):
    """The entry's converted directory, as a first download would have left it."""
    out = home / "converted" / entry.name
    write_model_dir(CLIP_CASE / "model.safetensors", entry.model_cfg(), out, dtype="fp32")
    return out


def _features(model: CLIP) -> np.ndarray:
    inputs = np.load(CLIP_CASE / "inputs.npz")
    with paddle.no_grad():
        return model.encode_image(paddle.to_tensor(inputs["image"])).numpy()


# ------------------------------------------------------------------------------ config schemas


def test_config_kind_recognises_each_schema_by_its_markers(tmp_path):
    open_clip = _json(CLIP_CASE / "model_config.json")
    assert config_kind(open_clip) == "open_clip"
    assert config_kind({"model_cfg": open_clip, "preprocess_cfg": {"mean": MEAN}}) == "open_clip_config"
    assert config_kind(_json(HF_DIR / "config.json")) == "hf"
    for case in ("clip_vit_quickgelu", "eva01"):  # PaddleMIX's CLIPConfig ('clip') and EVACLIPConfig ('evaclip')
        assert config_kind(_json(LEGACY / case / "config.json")) == "paddlemix_legacy"
    CLIPConfig.from_model_cfg(open_clip).save_pretrained(str(tmp_path))
    assert config_kind(_json(tmp_path / "config.json")) == "paddlemix"
    for raw in ({"model_type": "clip"}, {"model_type": "bert", "vision_cfg": {}, "text_cfg": {}}, [1, 2], "x"):
        assert config_kind(raw) is None


def test_model_type_clip_is_paddlemix_with_vision_cfg_and_hf_with_vision_config_only():
    legacy = _json(LEGACY / "clip_vit_quickgelu" / "config.json")
    assert legacy["model_type"] == "clip" and "vision_config" in legacy  # PaddleNLP copies the towers there too
    assert config_kind(legacy) == "paddlemix_legacy"
    hf = _json(HF_DIR / "config.json")
    assert hf["model_type"] == "clip" and "vision_cfg" not in hf
    assert config_kind(hf) == "hf"
    # The same model_type, told apart by the tower key alone.
    assert config_kind({"model_type": "clip", "vision_cfg": {"width": 64}}) == "paddlemix_legacy"
    assert config_kind({"model_type": "clip", "vision_config": {"hidden_size": 64}}) == "hf"


def test_read_model_config_translates_every_schema_to_the_same_architecture(tmp_path):
    reference = CLIPConfig.from_model_cfg(_json(CLIP_CASE / "model_config.json")).to_model_cfg()
    CLIPConfig.from_model_cfg(reference).save_pretrained(str(tmp_path / "paddlemix"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": reference, "preprocess_cfg": {"mean": MEAN}}))
    for path, kind in ((CLIP_CASE / "model_config.json", "open_clip"), (tmp_path / "paddlemix" / "config.json", "paddlemix"),
                       (tmp_path / "open_clip_config.json", "open_clip_config")):
        cfg, got = read_model_config(path)
        assert got == kind
        assert {k: v for k, v in CLIPConfig.from_model_cfg(cfg).to_model_cfg().items() if k != "preprocess_cfg"} == reference
    assert read_model_config(tmp_path / "open_clip_config.json")[0]["preprocess_cfg"] == {"mean": MEAN}
    hf_cfg, kind = read_model_config(HF_DIR / "config.json")
    assert kind == "hf" and hf_cfg["vision_cfg"]["image_size"] == _json(HF_DIR / "config.json")["vision_config"]["image_size"]
    legacy_cfg, kind = read_model_config(LEGACY / "eva01" / "config.json")
    assert kind == "paddlemix_legacy" and legacy_cfg["vision_cfg"]["eva_model_name"] == "eva-clip"


def test_config_errors_name_the_file(tmp_path):
    unknown = tmp_path / "config.json"
    unknown.write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=rf"model config {unknown} must be a JSON object with .*'vision_cfg'.*"
                                          r"found model_type 'bert'"):
        read_model_config(unknown)
    bad = _json(CLIP_CASE / "model_config.json")
    bad["vision_cfg"]["widht"] = 64
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": bad}))
    with pytest.raises(ConfigError, match=rf"model config {tmp_path / 'open_clip_config.json'}: .*'widht'"):
        resolve(tmp_path)  # the directory's open_clip_config.json, validated before anything is built


# --------------------------------------------------------------------------------- the rules


def test_architecture_name_resolves_to_its_config_and_no_weights():
    got = resolve("ViT-L/14")  # OpenAI's spelling
    assert isinstance(got, Resolved)
    assert (got.source, got.weights, got.config_kind, got.entry) == ("architecture", None, None, None)
    assert got.model_cfg == get_model_config("ViT-L-14")
    got.model_cfg["embed_dim"] = 1  # a private copy
    assert resolve("ViT-L-14").model_cfg == get_model_config("ViT-L-14")


def test_architecture_and_tag_resolve_to_the_cached_zoo_directory(cached, entry):
    for tag in ("tiny_tag", "Tiny-Tag"):
        got = resolve("tiny-resolve-arch", tag)
        assert (got.source, got.weights, got.layout, got.entry, got.model_dir) == ("zoo", cached, "paddlemix", entry, cached)
        assert got.model_cfg["preprocess_cfg"]["mean"] == MEAN
    with pytest.raises(zoo.UnknownPretrainedError, match=r"registered tags for 'tiny-resolve-arch': \['tiny_tag'\]"):
        resolve("tiny-resolve-arch", "other_tag")


def test_zoo_name_and_its_source_ids_resolve_to_the_same_entry(cached, entry):
    for name in ("tiny-resolve-CLIP", "paddlemix/CLIP/tiny-resolve-CLIP", "laion/tiny-resolve",
                 "hf-hub:laion/tiny-resolve", "paddlemix:tiny-resolve-CLIP"):
        got = resolve(name)
        assert (got.name, got.source, got.weights, got.entry) == (name, "zoo", cached, entry)


def test_download_false_gives_the_zoo_config_without_fetching(home, entry):
    got = resolve("tiny-resolve-CLIP", download=False)  # nothing cached, and offline: no fetch happened
    assert (got.source, got.weights, got.entry) == ("zoo", None, entry)
    assert got.model_cfg["preprocess_cfg"]["mean"] == MEAN
    assert not home.exists()


def test_pretrained_path_replaces_the_weights_and_nothing_is_fetched(home, entry):
    weights = CLIP_CASE / "model.safetensors"
    got = resolve("tiny-resolve-CLIP", weights)
    assert (got.source, got.weights, got.layout) == ("weights-path", weights, None)
    assert got.model_cfg["preprocess_cfg"]["mean"] == MEAN and not home.exists()
    missing = "no/such/weights.bin"  # a path, not a tag: the loader reports it
    assert resolve("ViT-B-32", missing).weights == missing


def test_model_directories_of_each_kind(home, tmp_path):
    hf = resolve(HF_DIR)
    assert (hf.source, hf.config_kind, hf.weights, hf.layout, hf.model_dir) == ("model-dir", "hf", HF_DIR, "hf", HF_DIR)
    legacy = LEGACY / "clip_vit_quickgelu"
    kept = resolve(legacy, download=False)  # read in place
    assert (kept.config_kind, kept.weights, kept.layout) == ("paddlemix_legacy", legacy, "paddlemix_legacy")
    assert not home.exists()
    converted = resolve(legacy, cache_dir=tmp_path / "cache")  # converted once, into the given cache
    assert converted.weights.parent == tmp_path / "cache" / "converted" / "local"
    assert (converted.layout, converted.model_dir) == ("paddlemix", legacy)
    # A plain open_clip model config describes an architecture, unless weights sit beside it.
    arch_only = tmp_path / "arch"
    arch_only.mkdir()
    shutil.copy(CLIP_CASE / "model_config.json", arch_only / "config.json")
    assert resolve(arch_only).weights is None
    shutil.copy(CLIP_CASE / "model.safetensors", arch_only / "model.safetensors")
    assert resolve(arch_only).weights == arch_only


def test_open_clip_config_json_is_read_before_config_json(tmp_path):
    """open_clip's HF-hub repos carry open_clip_config.json (with the transforms) beside an HF config.json."""
    shutil.copytree(HF_DIR, tmp_path / "repo")
    cfg = read_model_config(HF_DIR / "config.json")[0]
    (tmp_path / "repo" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": MEAN}}))
    got = resolve(tmp_path / "repo")
    assert (got.config_kind, got.weights, got.layout) == ("open_clip_config", tmp_path / "repo", None)
    assert got.model_cfg["preprocess_cfg"] == {"mean": MEAN}


def test_config_file_gives_a_config_and_no_weights(tmp_path):
    got = resolve(CLIP_CASE / "model_config.json")
    assert (got.source, got.config_kind, got.weights) == ("config-file", "open_clip", None)
    assert resolve(str(HF_DIR / "config.json")).config_kind == "hf"  # any known schema
    with pytest.raises(UnresolvedModelError, match=f"model config {tmp_path / 'nope.json'} does not exist"):
        resolve(tmp_path / "nope.json")


# ---------------------------------------------------------------------------- the prefixes


def test_local_dir_prefix(tmp_path, monkeypatch):
    assert resolve(f"local-dir:{HF_DIR}").weights == HF_DIR
    monkeypatch.chdir(HF_DIR.parent)
    assert resolve("local-dir:hf_clip").config_kind == "hf"  # relative paths, as open_clip's
    with pytest.raises(UnresolvedModelError, match="is not a directory; local-dir: takes a model directory"):
        resolve(f"local-dir:{CLIP_CASE / 'model_config.json'}")
    with pytest.raises(UnresolvedModelError, match="names nothing after 'local-dir:'"):
        resolve("local-dir:")


def test_hf_hub_prefix_of_a_repository_the_zoo_lists_is_that_entry(home, entry):
    got = resolve("hf-hub:laion/tiny-resolve", download=False)  # offline: nothing fetched, not even a config
    assert (got.source, got.entry) == ("zoo", entry) and not home.exists()


def test_paddlemix_prefix_fetches_names_that_are_also_architectures(home):
    """EVA-CLIP's names are architectures and zoo names: bare, the architecture; prefixed, the zoo weights."""
    assert resolve("EVA02-CLIP-L-14").source == "architecture"
    got = resolve("paddlemix:EVA02-CLIP-L-14", download=False)
    assert (got.source, got.entry.name) == ("zoo", "EVA02-CLIP-L-14")
    assert got.model_cfg["preprocess_cfg"]["interpolation"] == "bicubic"
    with pytest.raises(UnresolvedModelError, match=r"'ViT-B-32' is not a zoo name"):
        resolve("paddlemix:ViT-B-32")


def test_prefixed_name_with_a_tag_is_refused(entry):
    with pytest.raises(UnresolvedModelError, match="pretrained tag 'tiny_tag' needs an architecture name"):
        resolve("paddlemix:tiny-resolve-CLIP", "tiny_tag")


# ---------------------------------------------------------------------------- precedence and errors


def test_an_existing_directory_wins_over_an_architecture_of_the_same_name(tmp_path, monkeypatch):
    shutil.copytree(HF_DIR, tmp_path / "ViT-B-32")
    monkeypatch.chdir(tmp_path)
    assert resolve("ViT-B-32").source == "model-dir"
    assert resolve("ViT-B-16").source == "architecture"


def test_unknown_name_names_the_input_close_names_and_the_accepted_forms():
    with pytest.raises(UnresolvedModelError) as info:
        resolve("ViT-B-33")
    err = info.value
    assert isinstance(err, UnknownModelError) and isinstance(err, KeyError) and isinstance(err, FileNotFoundError)
    assert isinstance(err, PaddleMIXError)
    message = str(err)
    for fragment in ("unknown model 'ViT-B-33'", "Did you mean", "'ViT-B-32'", "local-dir:PATH", "hf-hub:ORG/REPO",
                     "paddlemix:ZOO_NAME", "pretrained=TAG", "list_models()"):
        assert fragment in message, fragment


def test_directory_without_a_config_is_named(tmp_path):
    with pytest.raises(UnresolvedModelError, match=f"model directory {tmp_path} has no config.json"):
        resolve(tmp_path)


# ---------------------------------------------------------------------------- the entry points


def test_entry_points_resolve_through_the_resolver(cached, tmp_path):
    direct = _features(paddlemix.create_model(HF_DIR))
    np.testing.assert_array_equal(_features(paddlemix.create_model(f"local-dir:{HF_DIR}")), direct)
    np.testing.assert_array_equal(_features(CLIP.from_pretrained(f"local-dir:{HF_DIR}")), direct)
    zoo_model = paddlemix.create_model("tiny-resolve-arch", pretrained="tiny_tag")
    np.testing.assert_array_equal(_features(zoo_model), _features(CLIP.from_pretrained("paddlemix:tiny-resolve-CLIP")))
    assert paddlemix.get_model_preprocess_cfg(zoo_model)["mean"] == MEAN
    assert paddlemix.get_tokenizer(f"local-dir:{HF_DIR}").context_length == read_model_config(
        HF_DIR / "config.json")[0]["text_cfg"]["context_length"]
    with pytest.raises(UnresolvedModelError, match="'ViT-B-32' gives a model config but no weights"):
        CLIP.from_pretrained("ViT-B-32")


def test_weights_required_prefers_the_zoo_entry_of_a_name_that_is_also_an_architecture(home):
    """CLIP.from_pretrained('EVA02-CLIP-L-14') means EVA-CLIP's weights; create_model('EVA02-CLIP-L-14') the architecture."""
    assert resolve("EVA02-CLIP-L-14").source == "architecture"
    with pytest.raises(DownloadError, match="(?s)could not get the weights of 'EVA02-CLIP-L-14'.*offline mode is on"):
        CLIP.from_pretrained("EVA02-CLIP-L-14")  # offline and not cached: it tried the zoo, not the architecture
    with pytest.raises(UnresolvedModelError, match=r"resolved as 'config-file'"):
        resolve(CLIP_CASE / "model_config.json", weights_required=True)


# ------------------------------------------------------------------ hf-hub: an unregistered open_clip repo


REPO = "someone/tiny-open-clip"


@pytest.fixture
def hub(home, monkeypatch):
    """An HF-hub-like server with one open_clip repository the zoo does not list (a .bin, no safetensors)."""
    from zoo_server import ZooServer

    config = {"model_cfg": _json(CLIP_CASE / "model_config.json"), "preprocess_cfg": {"mean": MEAN, "std": MEAN}}
    files = {f"{REPO}/resolve/main/open_clip_config.json": json.dumps(config).encode(),
             f"{REPO}/resolve/main/open_clip_pytorch_model.bin": (CLIP_CASE / "pytorch_model.bin").read_bytes()}
    monkeypatch.delenv("PADDLEMIX_OFFLINE")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    with ZooServer(files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.base_url)
        yield server


def test_hf_hub_prefix_reads_an_unregistered_open_clip_repository(hub, home, monkeypatch):
    cfg = resolve(f"hf-hub:{REPO}", download=False)  # get_tokenizer's way: the config file only
    assert (cfg.source, cfg.config_kind, cfg.weights) == ("hf-hub", "open_clip_config", None)
    assert hub.gets(f"{REPO}/resolve/main/open_clip_pytorch_model.bin") == []
    model = paddlemix.create_model(f"hf-hub:{REPO}")
    reference = paddlemix.create_model(CLIP_CASE / "model_config.json", pretrained=CLIP_CASE / "pytorch_model.bin")
    np.testing.assert_array_equal(_features(model), _features(reference))  # kept in its precision: exact
    assert paddlemix.get_model_preprocess_cfg(model)["mean"] == MEAN
    # open_clip's order: the safetensors file first (absent here), then the .bin.
    assert [r.status for r in hub.log if "open_clip_model.safetensors" in r.path] == [404]
    assert len(hub.gets(f"{REPO}/resolve/main/open_clip_pytorch_model.bin")) == 1
    out = home / "converted" / "hf-hub" / REPO
    manifest = _json(out / "manifest.json")
    assert (manifest["source"]["source"], manifest["source"]["repo"]) == ("hf-hub", REPO)
    # Converted once: later loads, offline, read the cache.
    hub.stop()
    monkeypatch.setenv("PADDLEMIX_OFFLINE", "1")
    again = resolve(f"hf-hub:{REPO}")
    assert (again.weights, again.layout) == (out, "paddlemix")
    np.testing.assert_array_equal(_features(CLIP.from_pretrained(f"hf-hub:{REPO}")), _features(reference))


def test_hf_hub_repository_errors_name_what_was_fetched(hub):
    with pytest.raises(DownloadError, match=r"someone/missing/resolve/main/open_clip_config\.json"):
        resolve("hf-hub:someone/missing")
    with pytest.raises(UnresolvedModelError, match=r"'\.\./etc' is not a Hugging Face repository id"):
        resolve("hf-hub:../etc")
