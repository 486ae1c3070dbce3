"""Package-wide structure: one exception base, and the dependency direction between subpackages."""
import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import paddlemix
from paddlemix.errors import PaddleMIXError


def _all_modules():
    names = ["paddlemix"]
    for info in pkgutil.walk_packages(paddlemix.__path__, prefix="paddlemix."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        names.append(info.name)
    return names


def test_every_exception_class_derives_from_paddlemix_error():
    checked, offenders = [], []
    for name in _all_modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if obj.__module__ != name or attr.startswith("_"):
                continue  # re-exported from elsewhere, or private control flow
            checked.append(f"{name}.{attr}")
            if not issubclass(obj, PaddleMIXError):
                offenders.append(f"{name}.{attr}")
    assert not offenders, f"exception classes not deriving from PaddleMIXError: {offenders}"
    # the walk really found the package's exceptions (guards against an empty walk passing)
    assert "paddlemix.models.config.ConfigError" in checked
    assert "paddlemix.zoo.formats.common.CheckpointError" in checked
    assert len(checked) >= 12


@pytest.mark.parametrize(
    "cls_path, builtin",
    [
        ("paddlemix.models.config.ConfigError", ValueError),
        ("paddlemix.zoo.formats.common.CheckpointError", ValueError),
        ("paddlemix.zoo.key_maps.ConversionError", ValueError),
        ("paddlemix.zoo.loading.WeightLoadError", ValueError),
        ("paddlemix.inference.ExportError", ValueError),
        ("paddlemix.zoo.registry.UnknownModelError", KeyError),
        ("paddlemix.zoo.pretrained.UnknownPretrainedError", KeyError),
        ("paddlemix.zoo.download.DownloadError", RuntimeError),
        ("paddlemix.data.sources.common.SkippedTooManyError", RuntimeError),
        ("paddlemix.train.checkpointing.CheckpointSaveError", OSError),
    ],
)
def test_exceptions_keep_the_builtin_callers_catch(cls_path, builtin):
    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, PaddleMIXError) and issubclass(cls, builtin)


def test_base_is_exported():
    assert paddlemix.PaddleMIXError is PaddleMIXError


# ----------------------------------------------------------------------------- dependency direction

PACKAGE_DIR = Path(paddlemix.__file__).parent


def _imports(path: Path):
    """``(line, imported module)`` for every import in a file of the package."""
    module = ".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return _imports_in(path.read_text(encoding="utf-8"), module, str(path))


def _imports_in(source: str, module: str, filename: str = "<probe>"):
    """Imports at any depth (function-level ones too), relative ones resolved to absolute names;
    ``from a import b`` yields both ``a`` and ``a.b``; ``import_module("x")`` with a literal yields ``x``."""
    parts = module.split(".")
    package = parts[:-1]  # the package a relative import starts from (for __init__ too)
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:  # `from .. import kernels` imports paddlemix.kernels, not the root package
                yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module",
            "__import__",
        ):
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value


def _layer(module: str) -> str:
    """The part of paddlemix a module belongs to: its subpackage, or its top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "paddlemix"


def _layer_graph():
    edges = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        src = _layer(".".join(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts))
        for lineno, target in _imports(path):
            if target.split(".")[0] != "paddlemix":
                continue
            dst = _layer(target)
            if src != dst and src != "paddlemix":  # the root __init__ assembles the public API from all layers
                edges.setdefault(src, {}).setdefault(dst, f"{path.relative_to(PACKAGE_DIR.parent)}:{lineno}")
    return edges


def test_import_scanner_sees_function_level_relative_and_dynamic_imports():
    code = (
        "from .config import CLIPConfig\n"
        "def from_pretrained():\n"
        "    from ..zoo.loading import load_checkpoint\n"
        "    import importlib\n"
        "    return importlib.import_module('paddlemix.zoo.pretrained')\n"
    )
    found = {target for _, target in _imports_in(code, "paddlemix.models.clip_model")}
    assert {"paddlemix.models.config", "paddlemix.zoo.loading", "paddlemix.zoo.pretrained"} <= found
    assert {t for _, t in _imports_in("from . import layers", "paddlemix.models.__init__")} == {"paddlemix.models.layers"}
    assert {t for _, t in _imports_in("from .. import kernels", "paddlemix.models.fused_norm")} == {"paddlemix.kernels"}


def test_models_import_nothing_from_the_zoo():
    offenders = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{lineno} imports {target}"
        for path in sorted((PACKAGE_DIR / "models").rglob("*.py"))
        for lineno, target in _imports(path)
        if target.startswith("paddlemix.zoo") or target.startswith("paddlemix.hub")
    ]
    assert not offenders, offenders
    # and only the layers below them: the errors module and (once it exists) the kernels
    allowed = {"models", "errors", "kernels", "_util"}
    assert set(_layer_graph().get("models", {})) <= allowed, _layer_graph()["models"]


def test_no_import_cycle_between_subpackages():
    edges = _layer_graph()
    assert "zoo" in edges.get("factory", {}) and "models" in edges.get("zoo", {})  # the scan sees real edges
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                where = [edges[a][b] for a, b in zip(cycle, cycle[1:])]
                pytest.fail(f"import cycle {' -> '.join(cycle)} at {where}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_from_pretrained_reaches_the_zoo_loader():
    from paddlemix.models import CLIP
    from paddlemix.zoo import load_pretrained_model

    assert CLIP._pretrained_loader is load_pretrained_model
    with pytest.raises(TypeError, match="unsupported from_pretrained arguments"):
        CLIP.from_pretrained("anything", unknown=1)
