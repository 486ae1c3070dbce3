"""Pretrained weights: the zoo registry, and resolving a zoo name to a local model directory.

The registry is data (``paddlemix/zoo/pretrained.json``): every entry names an architecture
config, the preprocessing the weights were trained with, published numbers, and where the
weights live: PaddleMIX's host (``<host>/paddlemix/CLIP/<name>/{config.json,
model_state.pdparams}``, Paddle fp16/bf16) and the public PyTorch release on the HF hub.

Whatever the source, the first use converts the weights once into the cache as a
paddlemix model directory (``config.json`` with ``preprocess_cfg`` + ``model.safetensors``
in the zoo's half precision + ``manifest.json``), under ``<cache>/converted/<name>``.
Later loads memory-map that file and never touch the network; with
``PADDLEMIX_OFFLINE=1`` a missing file is an error naming what was looked for.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import paddle

from .._util import exclusive_lock
from ..errors import PaddleMIXError
from ..models.config import CLIPConfig
from ..models.transformer import TextTransformer, VisionTransformer
from .checkpoint import iter_checkpoint_shards
from .key_maps import ConversionError, convert_state_dict, detect_layout, hf_config_to_model_cfg
from .download import (
    DownloadError,
    cache_dir as default_cache_root,
    download_file,
    fetch,
    file_sha256,
    is_offline,
    model_url,
)
from .model_dir import CONFIG_NAME, MANIFEST_NAME, manifest_problem, write_model_dir
from .legacy import is_legacy_config, legacy_config_to_model_cfg, paddlemix_differences
from .loading import WeightLoadError, load_state_dict_into
from .registry import UnknownModelError, get_model_config, load_config_file, read_json

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRY_FILE",
    "PretrainedEntry",
    "PretrainedRegistry",
    "UnknownPretrainedError",
    "default_registry",
    "download_pretrained",
    "get_pretrained_entry",
    "list_pretrained",
    "list_pretrained_tags",
    "load_tower",
    "model_config",
    "register_pretrained",
    "resolve_factory_args",
    "resolve_model_dir",
    "resolve_pretrained",
    "unregister_pretrained",
]

REGISTRY_FILE = Path(__file__).resolve().with_name("pretrained.json")
ENV_HF_ENDPOINT = "HF_ENDPOINT"  # the variable huggingface_hub itself reads, so one setting serves both
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
SOURCES = ("paddlemix", "hf")
PADDLEMIX_FILES = ("config.json", "model_state.pdparams")
HF_HUB_PREFIX = "hf-hub:"
_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


class UnknownPretrainedError(PaddleMIXError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class HFSource:
    """A file of a Hugging Face hub repository and the key layout of the state dict in it."""

    repo: str
    file: str
    layout: Optional[str] = None
    revision: str = "main"

    def url(self, endpoint: str) -> str:
        return f"{endpoint.rstrip('/')}/{self.repo}/resolve/{self.revision}/{self.file}"


@dataclass(frozen=True)
class PretrainedEntry:
    """One set of pretrained weights. See ``doc.fields`` in ``paddlemix/zoo/pretrained.json``."""

    name: str
    arch: str
    tag: str
    image_size: int
    preprocess: Mapping[str, Any]
    params_m: Optional[float] = None
    in1k_top1: Optional[float] = None
    dtype: str = "fp16"
    family: str = ""
    paddlemix: Optional[str] = None
    hf: Optional[HFSource] = None
    tag_aliases: Tuple[str, ...] = ()
    sha256: Mapping[str, str] = field(default_factory=dict)
    params_reported: Optional[str] = None
    note: Optional[str] = None
    # An inline open_clip-schema config instead of ``paddlemix/model_configs/<arch>.json`` (custom zoos, tests).
    model_cfg_override: Optional[Mapping[str, Any]] = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], presets: Optional[Mapping[str, Any]] = None) -> "PretrainedEntry":
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__} | {"model_cfg"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"pretrained entry {d.get('name')!r}: unknown keys {unknown}; valid keys are {sorted(known)}")
        for key in ("name", "arch", "tag", "image_size", "preprocess"):
            if key not in d:
                raise ValueError(f"pretrained entry {d.get('name')!r} has no {key!r}")
        preprocess = d["preprocess"]
        if isinstance(preprocess, str):
            if not presets or preprocess not in presets:
                raise ValueError(f"pretrained entry {d['name']!r}: unknown preprocess preset {preprocess!r}")
            preprocess = presets[preprocess]
        missing = [k for k in _PREPROCESS_KEYS if k not in preprocess]
        if missing:
            raise ValueError(f"pretrained entry {d['name']!r}: preprocess lacks {missing}")
        if d.get("dtype", "fp16") not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"pretrained entry {d['name']!r}: dtype must be fp16, bf16 or fp32, got {d['dtype']!r}")
        hf = d.get("hf")
        if isinstance(hf, Mapping):
            hf = HFSource(**hf)
        if d.get("paddlemix") is None and hf is None:
            raise ValueError(f"pretrained entry {d['name']!r} has no source; give 'paddlemix' and/or 'hf'")
        return cls(
            name=d["name"], arch=d["arch"], tag=d["tag"], image_size=int(d["image_size"]),
            preprocess={k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in preprocess.items()},
            params_m=d.get("params_m"), in1k_top1=d.get("in1k_top1"), dtype=d.get("dtype", "fp16"),
            family=d.get("family", ""), paddlemix=d.get("paddlemix"), hf=hf,
            tag_aliases=tuple(d.get("tag_aliases", ())), sha256=dict(d.get("sha256", {})),
            params_reported=d.get("params_reported"), note=d.get("note"),
            model_cfg_override=d.get("model_cfg", d.get("model_cfg_override")),
        )

    def preprocess_cfg(self) -> Dict[str, Any]:
        """The ``preprocess_cfg`` stored in the converted model's config.json.

        The size is left to the tower (``image_size``), so ``force_image_size`` keeps the
        transforms and the model in step.
        """
        return {k: self.preprocess[k] for k in _PREPROCESS_KEYS}

    def model_cfg(self) -> Dict[str, Any]:
        """The open_clip-schema config of the architecture, with this entry's preprocessing."""
        if self.model_cfg_override is not None:
            cfg = copy.deepcopy(dict(self.model_cfg_override))
        else:
            cfg = get_model_config(self.arch)
        cfg["preprocess_cfg"] = self.preprocess_cfg()
        return cfg


class PretrainedRegistry:
    """Entries by zoo name, with lookups by (arch, tag) and by source id."""

    def __init__(self, entries: Iterator[PretrainedEntry] = ()):
        self._entries: Dict[str, PretrainedEntry] = {}
        for entry in entries:
            self.add(entry)

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "PretrainedRegistry":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"pretrained registry {path} is missing; install paddlemix from its source tree (pip install -e .)"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"pretrained registry {path} is not valid JSON: {e}") from e
        presets = data.get("preprocess", {})
        return cls(PretrainedEntry.from_dict(d, presets) for d in data.get("models", []))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[PretrainedEntry]:
        return iter(self._entries.values())

    def add(self, entry: PretrainedEntry) -> None:
        if entry.name in self._entries:
            raise ValueError(f"pretrained name {entry.name!r} is registered twice")
        clash = self.find(entry.arch, entry.tag)
        if clash is not None:
            raise ValueError(f"({entry.arch!r}, {entry.tag!r}) is already registered as {clash.name!r}")
        self._entries[entry.name] = entry

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def _aliases(self) -> Dict[str, PretrainedEntry]:
        """Other spellings of a name that identify exactly one entry."""
        counts: Dict[str, List[PretrainedEntry]] = {}
        for e in self._entries.values():
            keys = [e.paddlemix] if e.paddlemix else []
            if e.hf is not None:
                keys += [e.hf.repo, HF_HUB_PREFIX + e.hf.repo]
            for key in keys:
                counts.setdefault(key, []).append(e)
        return {k: v[0] for k, v in counts.items() if len(v) == 1}

    def find(self, name_or_arch: str, tag: Optional[str] = None) -> Optional[PretrainedEntry]:
        """The entry for a zoo name / source id, or for (arch, tag); None if there is none."""
        if tag is None:
            return self._entries.get(name_or_arch) or self._aliases().get(name_or_arch)
        arch = name_or_arch.replace("/", "-")  # PaddleMIX / OpenAI spell ViT-L/14
        clean = tag.lower().replace("-", "_")
        for e in self._entries.values():
            if e.arch == arch and clean in (e.tag, *e.tag_aliases):
                return e
        return None

    def get(self, name_or_arch: str, tag: Optional[str] = None) -> PretrainedEntry:
        entry = self.find(name_or_arch, tag)
        if entry is not None:
            return entry
        if tag is not None:
            tags = self.tags(name_or_arch)
            hint = f"registered tags for {name_or_arch!r}: {tags}" if tags else f"{name_or_arch!r} has no pretrained tags"
            quick = self.tags(name_or_arch + "-quickgelu")
            if tag.lower().replace("-", "_") in quick:
                hint += f"; {tag!r} exists for {name_or_arch + '-quickgelu'!r} (these weights were trained with QuickGELU)"
            raise UnknownPretrainedError(
                f"no pretrained weights ({name_or_arch!r}, {tag!r}): {hint}. paddlemix.list_pretrained() lists all pairs."
            )
        close = difflib.get_close_matches(name_or_arch, list(self._entries), n=5)
        raise UnknownPretrainedError(
            f"unknown pretrained model {name_or_arch!r}.{' Did you mean ' + str(close) + '?' if close else ''} "
            "paddlemix.zoo.pretrained.default_registry() lists the zoo names; a local model directory also works."
        )

    def tags(self, arch: str) -> List[str]:
        return [e.tag for e in self._entries.values() if e.arch == arch.replace("/", "-")]

    def pairs(self) -> List[Tuple[str, str]]:
        return [(e.arch, e.tag) for e in self._entries.values()]


@lru_cache(maxsize=1)
def default_registry() -> PretrainedRegistry:
    """The registry read from ``paddlemix/zoo/pretrained.json`` (plus anything registered at run time)."""
    return PretrainedRegistry.from_file(REGISTRY_FILE)


def register_pretrained(entry: Union[PretrainedEntry, Mapping[str, Any]]) -> PretrainedEntry:
    """Add an entry to the default registry, e.g. a company's own fine-tuned weights on its mirror."""
    if not isinstance(entry, PretrainedEntry):
        entry = PretrainedEntry.from_dict(entry)
    default_registry().add(entry)
    return entry


def unregister_pretrained(name: str) -> None:
    default_registry().remove(name)


def list_pretrained(as_str: bool = False) -> List[Union[Tuple[str, str], str]]:
    """``(architecture, tag)`` pairs with pretrained weights, as open_clip lists them (or 'arch:tag')."""
    pairs = default_registry().pairs()
    return [f"{a}:{t}" for a, t in pairs] if as_str else pairs


def list_pretrained_tags(arch: str) -> List[str]:
    return default_registry().tags(arch)


def get_pretrained_entry(name_or_arch: str, tag: Optional[str] = None) -> PretrainedEntry:
    """Look up by zoo name, PaddleMIX id (``paddlemix/CLIP/<name>``), ``hf-hub:<repo>``, or (arch, tag)."""
    return default_registry().get(name_or_arch, tag)


# ------------------------------------------------------------------------------------ fetching


def _hf_endpoint(hf_endpoint: Optional[str]) -> str:
    return hf_endpoint or os.environ.get(ENV_HF_ENDPOINT) or DEFAULT_HF_ENDPOINT


def _fetch(
    root: Optional[Path], model_id: str, filename: str, host: Optional[str], sha256: Optional[str],
    offline: Optional[bool], progress: bool,
) -> Path:
    """``download.fetch`` into the default cache, or into ``root`` when one is given (clip.load's download_root)."""
    if root is None:
        return fetch(model_id, filename, host=host, sha256=sha256, offline=offline, progress=progress)
    dest = root / "models" / model_id / filename
    if not is_offline(offline):
        return download_file(model_url(model_id, filename, host), dest, sha256=sha256, progress=progress)
    if not dest.is_file():
        raise DownloadError(
            f"{filename!r} of model {model_id!r} is not cached and offline mode is on, so nothing was "
            f"downloaded. Looked for {dest}. To fix: run once with network access, or copy the file there."
        )
    return dest


def _check_legacy_config(entry: PretrainedEntry, config_file: Path) -> None:
    """Refuse hosted files whose config disagrees with the registry's architecture.

    A mismatch means the registry (or the host) is wrong; loading would fail later with a
    list of mis-shaped weights that hides the cause.
    """
    raw = read_json(config_file)
    if not is_legacy_config(raw):
        return  # a mirror may hold a paddlemix-schema config; the strict loader still checks the weights
    hosted, ours = legacy_config_to_model_cfg(raw), entry.model_cfg()
    checks = [("embed_dim", hosted["embed_dim"], ours["embed_dim"])]
    for tower in ("vision_cfg", "text_cfg"):
        for key in ("width", "layers", "patch_size", "image_size", "context_length", "vocab_size"):
            if key in hosted[tower] and key in ours[tower]:
                checks.append((f"{tower}.{key}", hosted[tower][key], ours[tower][key]))
    bad = [f"{k}: hosted {a!r}, registry {b!r}" for k, a, b in checks if _as_pair(a) != _as_pair(b)]
    if bad:
        raise ConversionError(
            f"{config_file} describes another architecture than {entry.arch!r} registered for {entry.name!r}: {bad}"
        )


def _as_pair(value: Any) -> Any:
    """Sizes may be written 224 or [224, 224]."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def paddlemix_numerics_note(entry: PretrainedEntry) -> Optional[str]:
    """For an entry PaddleMIX also hosts: how PaddleMIX's own classes compute differently with its weights.

    Zoo entries reproduce the original release (open_clip's / EVA-CLIP's code, whose published
    accuracy the table lists), whichever host the weights come from. PaddleMIX reads some
    switches differently (quick_gelu only in the text tower, EVA sub-LN eps), so for these
    entries its numbers differ from ours; a PaddleMIX directory loaded by path gives PaddleMIX's.
    """
    if not entry.paddlemix:
        return None
    try:
        differences = paddlemix_differences(entry.model_cfg())
    except ConversionError as e:  # an architecture PaddleMIX's classes cannot build at all
        differences = [str(e)]
    if not differences:
        return None
    return (f"reproduces the original release; PaddleMIX's own classes compute differently with these weights "
            f"({'; '.join(differences)}). Load PaddleMIX's directory by path for PaddleMIX's numbers.")


_NOTED: set = set()  # entries whose PaddleMIX note was logged: once per process, not on every load


def _note_paddlemix_numerics(entry: PretrainedEntry) -> None:
    if entry.name in _NOTED:
        return
    _NOTED.add(entry.name)
    note = paddlemix_numerics_note(entry)
    if note is not None:
        logger.warning("%s %s", entry.name, note)


def converted_dir(entry: PretrainedEntry, cache_dir: Optional[Union[str, Path]] = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "converted" / entry.name


def resolve_pretrained(
    name_or_arch: Union[str, PretrainedEntry],
    tag: Optional[str] = None,
    *,
    source: str = "auto",
    host: Optional[str] = None,
    hf_endpoint: Optional[str] = None,
    offline: Optional[bool] = None,
    cache_dir: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> Path:
    """A complete local model directory for registered weights, fetching and converting on first use.

    Args:
        name_or_arch: zoo name, PaddleMIX id, ``hf-hub:<repo>``, an architecture (with ``tag``), or an entry.
        source: 'auto' (PaddleMIX's host, then the HF hub), 'paddlemix' or 'hf'.
        host: PaddleMIX host, a URL or a directory laid out like it (default ``$PADDLEMIX_MODEL_HOST``).
        hf_endpoint: HF hub (or mirror) URL (default ``$HF_ENDPOINT``, else huggingface.co).
        offline: never use the network (default ``$PADDLEMIX_OFFLINE``).
        cache_dir: cache root (default ``$PADDLEMIX_HOME``, else ``~/.cache/paddlemix``).
    """
    entry = name_or_arch if isinstance(name_or_arch, PretrainedEntry) else get_pretrained_entry(name_or_arch, tag)
    _note_paddlemix_numerics(entry)
    if source not in ("auto",) + SOURCES:
        raise ValueError(f"source must be 'auto', 'paddlemix' or 'hf', got {source!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else None
    out = converted_dir(entry, cache_dir)
    if manifest_problem(out) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a distributed job may ask at once: one converts, the others wait and reuse it.
    with exclusive_lock(out.with_name(out.name + ".lock"), f"converting {entry.name}"):
        problem = manifest_problem(out)
        if problem is None:
            return out
        if out.exists():
            logger.warning("cached %s is unusable (%s); converting it again", out, problem)
        failures = []
        for name in (SOURCES if source == "auto" else (source,)):
            try:
                src, layout, where = _fetch_source(entry, name, root, host, hf_endpoint, offline, progress)
            except DownloadError as e:
                failures.append(f"[{name}] {e}")
                continue
            record = {"name": entry.name, "source": name, "from": where, "file": src.name,
                      "sha256": file_sha256(src), "size": src.stat().st_size}
            logger.info("converting %s from %s into %s", entry.name, where, out)
            return write_model_dir(src, entry.model_cfg(), out, dtype=entry.dtype, layout=layout, source=record,
                                   overwrite=True)
        if not failures:
            raise DownloadError(f"{entry.name!r} has no {source!r} source; it has {_sources_of(entry)}")
        raise DownloadError(f"could not get the weights of {entry.name!r}:\n  " + "\n  ".join(failures))


def _sources_of(entry: PretrainedEntry) -> List[str]:
    return [s for s, v in (("paddlemix", entry.paddlemix), ("hf", entry.hf)) if v]


def _fetch_source(
    entry: PretrainedEntry, source: str, root: Optional[Path], host: Optional[str], hf_endpoint: Optional[str],
    offline: Optional[bool], progress: bool,
) -> Tuple[Path, Optional[str], str]:
    """Download one source's files; return (weights file, its layout, where it came from)."""
    if source == "paddlemix" and entry.paddlemix:
        config, weights = (
            _fetch(root, entry.paddlemix, f, host, entry.sha256.get(f), offline, progress) for f in PADDLEMIX_FILES
        )
        _check_legacy_config(entry, config)
        return weights, "paddlemix_legacy", model_url(entry.paddlemix, PADDLEMIX_FILES[1], host)
    if source == "hf" and entry.hf is not None:
        hf = entry.hf
        endpoint = _hf_endpoint(hf_endpoint)
        # Cached as <root>/models/<repo>/resolve/<revision>/<file>, apart from PaddleMIX's ids.
        weights = _fetch(root, f"{hf.repo}/resolve/{hf.revision}", hf.file, endpoint, entry.sha256.get(hf.file),
                         offline, progress)
        return weights, hf.layout, hf.url(endpoint)
    raise DownloadError(f"{entry.name!r} has no {source!r} source")


def download_pretrained(arch: str, tag: str, cache_dir: Optional[str] = None) -> Path:
    """The local model directory of ``(arch, tag)``; what ``clip.load('ViT-B/32')`` uses with tag 'openai'."""
    return resolve_pretrained(arch, tag, cache_dir=cache_dir)


# ------------------------------------------------------------------------ local directories


def _legacy_dir_target(path: Path) -> Path:
    """Where a local PaddleMIX directory is converted to: keyed by its absolute path."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return default_cache_root() / "converted" / "local" / f"{path.name}-{key}"


def _convert_legacy_dir(path: Path, raw: Dict[str, Any]) -> Path:
    """A local PaddleMIX directory (its own config schema and .pdparams) as a paddlemix directory.

    Converted once into the cache, keeping the source's precision (a user's own fine-tuned
    fp32 weights stay fp32); converted again when the source weights change (size or mtime)
    or the translated architecture does (an edited config.json, or a corrected translation).
    """
    weights = path / PADDLEMIX_FILES[1]
    if not weights.is_file():
        raise FileNotFoundError(f"PaddleMIX model directory {path} has no {PADDLEMIX_FILES[1]}")
    st = weights.stat()
    model_cfg = legacy_config_to_model_cfg(raw)
    cfg_key = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()
    stamp = {"path": str(weights.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "model_cfg": cfg_key}
    out = _legacy_dir_target(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.with_name(out.name + ".lock"), f"converting {path}"):
        if manifest_problem(out) is None:
            recorded = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8")).get("source", {})
            if all(recorded.get(k) == v for k, v in stamp.items()):
                return out
        return write_model_dir(weights, model_cfg, out, dtype="keep", layout="paddlemix_legacy",
                               source={"source": "local PaddleMIX directory", **stamp}, overwrite=True)


def resolve_model_dir(name_or_path: Union[str, Path]) -> Path:
    """A local directory holding ``config.json`` and weights that paddlemix can load.

    ``name_or_path`` is a directory (``save_pretrained`` output, a converted zoo directory, an
    HF CLIP directory, or a PaddleMIX one, which is converted into the cache), or a zoo name
    (``CLIP-ViT-L-14-laion2B-s32B-b82K``, ``paddlemix/CLIP/<name>``, ``hf-hub:<repo>``),
    downloaded and converted on first use.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"model directory {path} has no {CONFIG_NAME}")
        raw = read_json(config_file)
        return _convert_legacy_dir(path, raw) if is_legacy_config(raw) else path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; give a model directory or a zoo name")
    entry = default_registry().find(str(name_or_path))
    if entry is None:
        close = difflib.get_close_matches(str(name_or_path), [e.name for e in default_registry()], n=5)
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a local model directory nor a zoo name."
            f"{' Did you mean ' + str(close) + '?' if close else ''} paddlemix.list_pretrained() lists the zoo."
        )
    return resolve_pretrained(entry)


OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"  # what open_clip's HF hub repos carry next to the weights


def _config_from_json(path: Path) -> Dict[str, Any]:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    if isinstance(raw.get("model_cfg"), dict):  # open_clip_config.json: architecture + preprocessing
        cfg = dict(raw["model_cfg"])
        if isinstance(raw.get("preprocess_cfg"), dict):
            cfg["preprocess_cfg"] = dict(raw["preprocess_cfg"])
        return cfg
    if is_legacy_config(raw):
        return legacy_config_to_model_cfg(raw)
    if raw.get("model_type") == "clip":
        return hf_config_to_model_cfg(raw)
    if raw.get("model_type") == CLIPConfig.model_type:
        return CLIPConfig.from_dict(raw).to_model_cfg()
    return load_config_file(path)


def model_config(model: Union[str, Path]) -> Dict[str, Any]:
    """The open_clip-schema config (with ``preprocess_cfg`` when known) that ``model`` names.

    ``model`` is a zoo name (its architecture and preprocessing), an architecture name, a config
    JSON in any supported schema (open_clip, ``open_clip_config.json``, PaddleMIX, HF, paddlemix),
    or a directory holding one. Never downloads anything.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        for name in (OPEN_CLIP_CONFIG_NAME, CONFIG_NAME):
            if (path / name).is_file():
                return _config_from_json(path / name)
        raise FileNotFoundError(f"{path} has neither {OPEN_CLIP_CONFIG_NAME} nor {CONFIG_NAME}")
    if path.is_file() or path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        return _config_from_json(path)
    entry = default_registry().find(str(model))
    if entry is not None:
        return entry.model_cfg()
    return get_model_config(str(model))


def _is_tag_like(value: str) -> bool:
    """A bare word (not a path): what a pretrained tag looks like."""
    return "/" not in value and os.sep not in value and not Path(value).suffix


def resolve_factory_args(
    model_name: Union[str, Path], pretrained: Optional[Union[str, Path]]
) -> Tuple[Union[str, Path], Optional[Union[str, Path]]]:
    """Map ``create_model``'s arguments onto local paths when they name zoo weights.

    * ``(arch, tag)`` registered (``create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')``)
      becomes the converted directory, whose config.json carries the arch and its preprocessing;
    * a zoo name / PaddleMIX id / ``hf-hub:`` id as ``model_name`` likewise;
    * a PaddleMIX model directory is converted;
    * anything else is returned unchanged. An architecture name alone never downloads.
    """
    if pretrained is not None:
        if isinstance(pretrained, str) and not Path(pretrained).exists():
            entry = default_registry().find(str(model_name), pretrained)
            if entry is not None:
                return resolve_pretrained(entry), None
            if _is_tag_like(pretrained) and not Path(str(model_name)).exists():
                default_registry().get(str(model_name), pretrained)  # raises, listing the valid tags
        return model_name, pretrained
    path = Path(model_name)
    if path.is_dir():
        return resolve_model_dir(path), None
    if isinstance(model_name, str) and path.suffix != ".json":
        try:
            get_model_config(model_name)
            return model_name, None
        except UnknownModelError:
            entry = default_registry().find(model_name)
            if entry is not None:
                return resolve_pretrained(entry), None
    return model_name, pretrained


# -------------------------------------------------------------------------------------- towers


def load_tower(tower: paddle.nn.Layer, path: Union[str, Path], layout: Optional[str] = None) -> None:
    """Load one tower's weights, strictly, from a tower file or from a whole-model checkpoint.

    Tower files (PaddleMIX's ``model_state_vision.pdparams`` / ``model_state_text.pdparams``,
    or any layout's tower state dict) hold names without the ``visual.`` / ``text.`` prefix;
    a whole-model checkpoint contributes only this tower's weights.
    """
    if isinstance(tower, VisionTransformer):
        prefix = "visual"
    elif isinstance(tower, TextTransformer):
        prefix = "text"
    else:
        raise TypeError(f"load_tower needs a VisionTransformer or TextTransformer (model.visual / model.text), "
                        f"got {type(tower).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tower weights {path} do not exist")

    def shards() -> Iterator[Dict[str, Any]]:
        for shard in iter_checkpoint_shards(path):
            whole = any(k.startswith(("visual.", "text.")) for k in shard)
            if not whole:
                shard = {f"{prefix}.{k}": v for k, v in shard.items()}
            try:
                converted = convert_state_dict(shard, layout or detect_layout(shard), lazy=True)
            except ConversionError as e:
                raise WeightLoadError(f"{path}: {e}") from e
            yield {k: v for k, v in converted.items() if k.startswith(prefix + ".")}

    holder = paddle.nn.Layer()
    setattr(holder, prefix, tower)  # names become '<prefix>.*' and the loader finds visual.grid_size
    load_state_dict_into(holder, shards(), layout="paddlemix", source=str(path))
