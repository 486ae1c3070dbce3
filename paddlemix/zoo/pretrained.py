"""Pretrained weights: the zoo registry, and fetching a zoo entry into a local model directory.

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
import json
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from .._util import exclusive_lock
from ..errors import PaddleMIXError
from .key_maps import ConversionError
from .download import (
    DownloadError,
    cache_dir as default_cache_root,
    download_file,
    fetch,
    file_sha256,
    is_offline,
    model_url,
)
from .model_dir import manifest_problem, write_model_dir
from .legacy import legacy_config_to_model_cfg, paddlemix_differences
from .registry import config_kind, get_model_config, read_json

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRY_FILE",
    "PretrainedEntry",
    "PretrainedRegistry",
    "UnknownPretrainedError",
    "default_registry",
    "download_pretrained",
    "fetch_hf_file",
    "get_pretrained_entry",
    "list_pretrained",
    "list_pretrained_tags",
    "register_pretrained",
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
    if config_kind(raw) != "paddlemix_legacy":
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


def fetch_hf_file(
    repo: str, filename: str, *, revision: str = "main", cache_dir: Optional[Union[str, Path]] = None,
    hf_endpoint: Optional[str] = None, sha256: Optional[str] = None, offline: Optional[bool] = None,
    progress: bool = True,
) -> Path:
    """One file of a Hugging Face hub repository, from the cache or the hub (``$HF_ENDPOINT`` or a mirror).

    Cached as ``<cache>/models/<repo>/resolve/<revision>/<file>``, apart from PaddleMIX's ids.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else None
    return _fetch(root, f"{repo}/resolve/{revision}", filename, _hf_endpoint(hf_endpoint), sha256, offline, progress)


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
        weights = fetch_hf_file(hf.repo, hf.file, revision=hf.revision, cache_dir=root, hf_endpoint=hf_endpoint,
                                sha256=entry.sha256.get(hf.file), offline=offline, progress=progress)
        return weights, hf.layout, hf.url(_hf_endpoint(hf_endpoint))
    raise DownloadError(f"{entry.name!r} has no {source!r} source")


def download_pretrained(arch: str, tag: str, cache_dir: Optional[str] = None) -> Path:
    """The local model directory of ``(arch, tag)``; what ``clip.load('ViT-B/32')`` uses with tag 'openai'."""
    return resolve_pretrained(arch, tag, cache_dir=cache_dir)
