"""How a name becomes a model: the one resolver behind every entry point.

``create_model``, ``create_model_and_transforms``, ``get_tokenizer``, ``CLIP.from_pretrained``,
``clip.load``, ``eva_clip`` and the CLIs all call :func:`resolve`, which turns what the user wrote
into a :class:`Resolved`: a validated open_clip-schema model config, where the weights are (or
None: random initialisation), what kind of source that was, and the weights' key layout when it is
known. Its rules, in order (the first that applies decides):

1. **Explicit prefixes** (as open_clip's ``parse_model_name``), so nothing is guessed:

   * ``local-dir:PATH``: the model directory ``PATH`` (rule 3), which must exist.
   * ``hf-hub:ORG/REPO``: a Hugging Face hub repository. One the zoo lists (``list_pretrained``) is
     that zoo entry, fetched and converted as in rule 6 (PaddleMIX's host first). Any other is read
     as open_clip reads it: its ``open_clip_config.json`` (the architecture under ``model_cfg``, the
     transforms under ``preprocess_cfg``) and its weights, ``open_clip_model.safetensors`` or else
     ``open_clip_pytorch_model.bin``, converted once (keeping their precision) into
     ``<cache>/converted/hf-hub/ORG/REPO``.
   * ``paddlemix:NAME``: the zoo entry ``NAME`` (a zoo name or PaddleMIX id); this also fetches
     the weights of the EVA-CLIP names that are architecture names too (rule 5 would build those
     with random weights).

2. **An architecture and a pretrained tag**: ``pretrained`` is given, is not an existing path, and
   ``(name, pretrained)`` is registered (tags ignore case and ``-``/``_``; ``ViT-L/14`` means
   ``ViT-L-14``): the entry's weights, as in rule 6. A bare word that is not a registered tag is an
   error listing the tags that are (an :class:`UnknownPretrainedError`); anything else in
   ``pretrained`` is a path to weights.
3. **An existing directory** is a model directory. Its config is ``open_clip_config.json`` when
   present, else ``config.json``, in any schema :func:`~paddlemix.zoo.registry.config_kind` knows
   (open_clip_config, PaddleMIX's own, HF CLIP, paddlemix, open_clip). The directory's files are
   the weights; a plain open_clip model config with no weights file beside it describes an
   architecture only (random weights).
   A PaddleMIX directory is converted once into ``<cache>/converted/local/`` and that copy is used.
4. **A config file** (an existing file, or any path ending in ``.json``): its config, in any of the
   same schemas; no weights.
5. **A registered architecture name** (``list_models()``; ``ViT-L/14`` and
   ``paddlemix/EVA/<arch>`` spellings included): its config; no weights. An architecture name
   never downloads anything, except where the caller needs weights (``CLIP.from_pretrained``,
   ``weights_required=True``): there a name that is also a zoo name (EVA-CLIP's) is the zoo entry.
6. **A zoo name**, PaddleMIX id (``paddlemix/CLIP/<name>``) or registered HF repo id: the entry's
   weights, downloaded and converted once into ``<cache>/converted/<name>``.
7. Anything else is an :class:`UnresolvedModelError` naming the input, close names, and these forms.

``pretrained`` as a path (a weights file or directory) replaces the weights of whatever the name
resolved to; the name then supplies only the config, and nothing is downloaded or converted.
``download=False`` (``get_tokenizer``, the convert CLI's ``--model``) fetches no weights and converts
nothing: a zoo entry gives its config and no weights, a PaddleMIX directory its own files, an
unregistered ``hf-hub:`` repository only its ``open_clip_config.json`` (as open_clip's ``get_tokenizer``).

The config is validated before anything is built; its errors name the file.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .._util import exclusive_lock
from ..models.config import CLIPConfig, ConfigError
from .checkpoint import CHECKPOINT_FILE_NAMES
from .key_maps import hf_config_to_model_cfg
from .download import DownloadError, cache_dir as default_cache_root, file_sha256
from .model_dir import CONFIG_NAME, MANIFEST_NAME, manifest_problem, write_model_dir
from .legacy import LEGACY_WEIGHTS_NAME, legacy_config_to_model_cfg
from .pretrained import HF_HUB_PREFIX, PretrainedEntry, default_registry, fetch_hf_file, resolve_pretrained
from .registry import CONFIG_KINDS, UnknownModelError, config_kind, get_model_config, list_models, read_json

__all__ = [
    "HF_HUB_PREFIX",
    "LOCAL_DIR_PREFIX",
    "OPEN_CLIP_CONFIG_NAME",
    "ZOO_PREFIX",
    "Resolved",
    "UnresolvedModelError",
    "read_model_config",
    "resolve",
]

LOCAL_DIR_PREFIX = "local-dir:"
ZOO_PREFIX = "paddlemix:"
PREFIXES = (LOCAL_DIR_PREFIX, HF_HUB_PREFIX, ZOO_PREFIX)
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"  # what open_clip's HF hub repos carry next to the weights
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
HF_WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order

ACCEPTED_FORMS = (
    "an architecture name (paddlemix.list_models()); an architecture with pretrained=TAG "
    "(paddlemix.list_pretrained()); a zoo name or PaddleMIX id (paddlemix/CLIP/<name>); a model directory "
    "or local-dir:PATH; a model-config JSON path; hf-hub:ORG/REPO (an open_clip repository); paddlemix:ZOO_NAME"
)

# Key layouts of the weights in a model directory whose config schema is known; None: detected from the keys.
_DIR_LAYOUTS = {"paddlemix": "paddlemix", "hf": "hf", "paddlemix_legacy": "paddlemix_legacy"}


class UnresolvedModelError(UnknownModelError, FileNotFoundError):
    """A model name that no rule of :func:`resolve` accepts, or a path that does not exist.

    A ``KeyError`` (an unknown name) and a ``FileNotFoundError`` (nothing at that path), as the
    separate functions this resolver replaced raised.
    """


@dataclass(frozen=True)
class Resolved:
    """What a model name resolved to.

    ``model_cfg`` is a validated open_clip-schema config (a private copy); ``weights`` the file or
    directory the loader reads, None for random initialisation; ``source`` which rule matched
    ('architecture', 'config-file', 'model-dir', 'zoo', 'hf-hub', 'weights-path'); ``config_kind`` the schema
    the config was read in (:data:`~paddlemix.zoo.registry.CONFIG_KINDS`, None for the registries);
    ``layout`` the weights' key layout when known (None: the loader detects it); ``model_dir`` the
    local model directory behind it, if any (where a BERT vocabulary may sit); ``entry`` the zoo entry.
    """

    name: str
    model_cfg: Dict[str, Any]
    weights: Optional[Union[str, Path]]
    source: str
    config_kind: Optional[str] = None
    layout: Optional[str] = None
    model_dir: Optional[Path] = None
    entry: Optional[PretrainedEntry] = None


def resolve(
    name: Union[str, "os.PathLike[str]"],
    pretrained: Optional[Union[str, "os.PathLike[str]"]] = None,
    *,
    cache_dir: Optional[Union[str, Path]] = None,
    download: bool = True,
    weights_required: bool = False,
) -> Resolved:
    """Resolve ``name`` (and ``pretrained``) by the rules in this module's docstring.

    Args:
        name: see the module docstring for the accepted forms.
        pretrained: a pretrained tag (with an architecture name), or a weights file or directory.
        cache_dir: cache root for downloads and conversions (default ``$PADDLEMIX_HOME``,
            else ``~/.cache/paddlemix``).
        download: False fetches no weights and converts nothing (see the module docstring).
        weights_required: the caller cannot use a config alone (rule 5), and a result without
            weights is an :class:`UnresolvedModelError`.
    """
    text = os.fspath(name)
    prefix, ident = _split_prefix(name)
    registry = default_registry()
    if isinstance(pretrained, str) and not Path(pretrained).exists():  # rule 2: a tag, or a missing path
        if prefix is not None and _is_tag_like(pretrained):
            raise UnresolvedModelError(
                f"pretrained tag {pretrained!r} needs an architecture name, but {text!r} already names its "
                "weights; drop pretrained, or give a weights path"
            )
        if prefix is None:
            entry = registry.find(ident, pretrained)
            if entry is not None:
                return _from_entry(text, entry, cache_dir, download)
            if _is_tag_like(pretrained) and not Path(ident).exists():
                registry.get(ident, pretrained)  # raises UnknownPretrainedError, listing the valid tags
    if pretrained is not None:
        # The name supplies the config only, so nothing it names is fetched or converted.
        resolved = _resolve_name(text, prefix, ident, cache_dir, False, weights_required)
        return replace(resolved, weights=pretrained, source="weights-path", layout=None)
    resolved = _resolve_name(text, prefix, ident, cache_dir, download, weights_required)
    if weights_required and resolved.weights is None:
        raise UnresolvedModelError(
            f"{text!r} gives a model config but no weights (it resolved as {resolved.source!r}); weights come from "
            "a model directory or a zoo name (paddlemix.list_pretrained()), or an architecture with "
            "pretrained=TAG or a weights path"
        )
    return resolved


def _split_prefix(name: Union[str, "os.PathLike[str]"]) -> Tuple[Optional[str], str]:
    """``(prefix, rest)``; a path object never carries a prefix."""
    if not isinstance(name, str):
        return None, os.fspath(name)
    for prefix in PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if not rest:
                raise UnresolvedModelError(f"{name!r} names nothing after {prefix!r}; accepted forms: {ACCEPTED_FORMS}")
            return prefix, rest
    return None, name


def _is_tag_like(value: str) -> bool:
    """A bare word, not a path: what a pretrained tag looks like."""
    return "/" not in value and os.sep not in value and not Path(value).suffix


def _resolve_name(
    text: str, prefix: Optional[str], ident: str, cache_dir: Optional[Union[str, Path]], download: bool,
    weights_required: bool,
) -> Resolved:
    registry = default_registry()
    if prefix == LOCAL_DIR_PREFIX:
        path = Path(ident).expanduser()
        if not path.is_dir():
            raise UnresolvedModelError(f"{text!r}: {path} is not a directory; local-dir: takes a model directory")
        return _from_dir(text, path, cache_dir, download)
    if prefix == HF_HUB_PREFIX:
        entry = registry.find(HF_HUB_PREFIX + ident)
        if entry is None:
            return _from_hf_repo(text, ident, cache_dir, download)
        return _from_entry(text, entry, cache_dir, download)
    if prefix == ZOO_PREFIX:
        entry = registry.find(ident)
        if entry is None:
            close = difflib.get_close_matches(ident, [e.name for e in registry], n=5)
            raise UnresolvedModelError(
                f"{text!r}: {ident!r} is not a zoo name.{' Did you mean ' + str(close) + '?' if close else ''} "
                "paddlemix.list_pretrained() lists the zoo."
            )
        return _from_entry(text, entry, cache_dir, download)
    path = Path(ident).expanduser()
    if path.is_dir():
        return _from_dir(text, path, cache_dir, download)
    if path.is_file() or path.suffix == ".json":
        if not path.is_file():
            raise UnresolvedModelError(f"model config {path} does not exist")
        cfg, kind = read_model_config(path)
        return Resolved(text, cfg, None, "config-file", config_kind=kind)
    entry = registry.find(ident)
    if entry is None or not weights_required:
        try:
            return Resolved(text, _checked(get_model_config(ident), ident), None, "architecture")
        except UnknownModelError:
            pass
    if entry is not None:
        return _from_entry(text, entry, cache_dir, download)
    close = difflib.get_close_matches(ident, list_models() + [e.name for e in registry], n=5)
    raise UnresolvedModelError(
        f"unknown model {text!r}: it is neither a local model directory nor a zoo name, a registered "
        f"architecture or a config file.{' Did you mean ' + str(close) + '?' if close else ''} "
        f"Accepted forms: {ACCEPTED_FORMS}. paddlemix.list_models() lists all architecture names."
    )


def _checked(cfg: Dict[str, Any], source: Any) -> Dict[str, Any]:
    CLIPConfig.check_model_cfg(cfg, source=source)
    return cfg


def _from_entry(text: str, entry: PretrainedEntry, cache_dir: Optional[Union[str, Path]], download: bool) -> Resolved:
    if not download:
        return Resolved(text, _checked(entry.model_cfg(), entry.name), None, "zoo", entry=entry)
    out = resolve_pretrained(entry, cache_dir=cache_dir)
    cfg, kind = read_model_config(out / CONFIG_NAME)
    return Resolved(text, cfg, out, "zoo", config_kind=kind, layout="paddlemix", model_dir=out, entry=entry)


def _cache_root(cache_dir: Optional[Union[str, Path]]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()


def _from_hf_repo(text: str, repo: str, cache_dir: Optional[Union[str, Path]], download: bool) -> Resolved:
    """An open_clip repository on the HF hub that the zoo does not list (``hf-hub:`` in rule 1)."""
    if not _HF_REPO_ID.fullmatch(repo) or ".." in repo:
        raise UnresolvedModelError(f"{text!r}: {repo!r} is not a Hugging Face repository id (ORG/REPO)")
    out = _cache_root(cache_dir) / "converted" / "hf-hub" / repo
    if manifest_problem(out) is None:
        cfg, kind = read_model_config(out / CONFIG_NAME)
        return Resolved(text, cfg, out, "hf-hub", config_kind=kind, layout="paddlemix", model_dir=out)
    config_file = fetch_hf_file(repo, OPEN_CLIP_CONFIG_NAME, cache_dir=cache_dir)
    cfg, kind = read_model_config(config_file)
    if kind != "open_clip_config":
        raise ConfigError(f"{config_file} of {text!r} is a {kind} config; an open_clip repository's "
                          f"{OPEN_CLIP_CONFIG_NAME} holds the architecture under 'model_cfg'")
    if not download:
        return Resolved(text, cfg, None, "hf-hub", config_kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a distributed job may ask at once: one converts, the others wait and reuse it.
    with exclusive_lock(out.with_name(out.name + ".lock"), f"converting {text}"):
        if manifest_problem(out) is not None:
            weights = _fetch_hf_weights(text, repo, cache_dir)
            record = {"source": "hf-hub", "repo": repo, "file": weights.name, "sha256": file_sha256(weights),
                      "size": weights.stat().st_size}
            write_model_dir(weights, cfg, out, dtype="keep", source=record, overwrite=True)
    cfg, kind = read_model_config(out / CONFIG_NAME)
    return Resolved(text, cfg, out, "hf-hub", config_kind=kind, layout="paddlemix", model_dir=out)


def _fetch_hf_weights(text: str, repo: str, cache_dir: Optional[Union[str, Path]]) -> Path:
    failures = []
    for filename in HF_WEIGHTS_FILES:
        try:
            return fetch_hf_file(repo, filename, cache_dir=cache_dir)
        except DownloadError as e:
            failures.append(str(e))
    raise DownloadError(f"could not get the weights of {text!r}; tried {list(HF_WEIGHTS_FILES)}:\n  " + "\n  ".join(failures))


def _from_dir(text: str, path: Path, cache_dir: Optional[Union[str, Path]], download: bool) -> Resolved:
    config_file = path / OPEN_CLIP_CONFIG_NAME
    if not config_file.is_file():
        config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise UnresolvedModelError(f"model directory {path} has no {CONFIG_NAME} (nor {OPEN_CLIP_CONFIG_NAME})")
    cfg, kind = read_model_config(config_file)
    if kind == "open_clip" and not any((path / f).is_file() for f in CHECKPOINT_FILE_NAMES):
        return Resolved(text, cfg, None, "model-dir", config_kind=kind, model_dir=path)  # an architecture only
    if kind == "paddlemix_legacy" and download:
        converted = _convert_legacy_dir(path, cfg, cache_dir)
        return Resolved(text, cfg, converted, "model-dir", config_kind=kind, layout="paddlemix", model_dir=path)
    return Resolved(text, cfg, path, "model-dir", config_kind=kind, layout=_DIR_LAYOUTS.get(kind), model_dir=path)


def read_model_config(path: Union[str, Path]) -> Tuple[Dict[str, Any], str]:
    """``(open_clip-schema config, schema kind)`` of a config JSON in any schema ``config_kind`` knows, validated.

    Errors name the file.
    """
    path = Path(path)
    raw = read_json(path)
    kind = config_kind(raw)
    try:
        if kind == "open_clip_config":  # the architecture under model_cfg, the transforms beside it
            cfg = copy.deepcopy(raw["model_cfg"])
            if isinstance(raw.get("preprocess_cfg"), dict):
                cfg["preprocess_cfg"] = dict(raw["preprocess_cfg"])
        elif kind == "paddlemix_legacy":
            cfg = legacy_config_to_model_cfg(raw)
        elif kind == "hf":
            cfg = hf_config_to_model_cfg(raw)
        elif kind == "paddlemix":
            cfg = CLIPConfig.from_dict(raw).to_model_cfg()
        elif kind == "open_clip":
            cfg = raw
        else:
            found = f"model_type {raw.get('model_type')!r}" if isinstance(raw, dict) else type(raw).__name__
            raise ConfigError(
                f"model config {path} must be a JSON object with 'embed_dim', 'vision_cfg' and 'text_cfg' "
                f"(an open_clip model config), or a config in another known schema ({', '.join(CONFIG_KINDS)}: "
                f"see paddlemix.zoo.registry.config_kind); found {found}"
            )
        CLIPConfig.check_model_cfg(cfg)
    except ConfigError as err:
        raise ConfigError(str(err) if str(path) in str(err) else f"model config {path}: {err}") from None
    return cfg, kind


def _legacy_dir_target(path: Path, cache_dir: Optional[Union[str, Path]]) -> Path:
    """Where a local PaddleMIX directory is converted to: keyed by its absolute path."""
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return _cache_root(cache_dir) / "converted" / "local" / f"{path.name}-{key}"


def _convert_legacy_dir(path: Path, model_cfg: Dict[str, Any], cache_dir: Optional[Union[str, Path]]) -> Path:
    """A local PaddleMIX directory (its own config schema and .pdparams) as a paddlemix directory.

    Converted once into the cache, keeping the source's precision (a user's own fine-tuned
    fp32 weights stay fp32); converted again when the source weights change (size or mtime)
    or the translated architecture does (an edited config.json, or a corrected translation).
    """
    weights = path / LEGACY_WEIGHTS_NAME
    if not weights.is_file():
        raise UnresolvedModelError(f"PaddleMIX model directory {path} has no {LEGACY_WEIGHTS_NAME}")
    st = weights.stat()
    cfg_key = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()
    stamp = {"path": str(weights.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "model_cfg": cfg_key}
    out = _legacy_dir_target(path, cache_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.with_name(out.name + ".lock"), f"converting {path}"):
        if manifest_problem(out) is None:
            recorded = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8")).get("source", {})
            if all(recorded.get(k) == v for k, v in stamp.items()):
                return out
        return write_model_dir(weights, model_cfg, out, dtype="keep", layout="paddlemix_legacy",
                               source={"source": "local PaddleMIX directory", **stamp}, overwrite=True)
