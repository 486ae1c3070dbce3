"""Package-wide structure: one exception base, and the dependency direction between subpackages."""
import importlib
import inspect
import pkgutil

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
    assert "paddlemix.zoo.checkpoint.CheckpointError" in checked
    assert len(checked) >= 12


@pytest.mark.parametrize(
    "cls_path, builtin",
    [
        ("paddlemix.models.config.ConfigError", ValueError),
        ("paddlemix.zoo.checkpoint.CheckpointError", ValueError),
        ("paddlemix.zoo.convert.ConversionError", ValueError),
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
