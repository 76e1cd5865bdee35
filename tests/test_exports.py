"""rlkernels.ops and rlkernels.reference export what their family modules declare."""
from __future__ import annotations

import importlib
import pkgutil
import sys
import types

import pytest

import rlkernels
from rlkernels import _exports, ops, reference


@pytest.mark.parametrize("package", [ops, reference], ids=["ops", "reference"])
def test_package_exports_every_family_module(package):
    expected = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        assert module.__all__, f"{module.__name__} exports nothing"
        for name in module.__all__:
            assert getattr(package, name) is getattr(module, name)
        expected += module.__all__
    assert package.__all__ == expected
    assert len(set(expected)) == len(expected)


def test_public_namespace_is_derived_from_ops():
    assert rlkernels.__all__ == ["BACKENDS", "info", "distributed", *ops.__all__]
    for name in ops.__all__:
        assert callable(getattr(rlkernels, name))


def test_two_modules_exporting_one_name_is_an_error(tmp_path, monkeypatch):
    package = tmp_path / "clash_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("__all__ = ['f']\ndef f():\n    return 1\n")
    (package / "b.py").write_text("__all__ = ['f']\ndef f():\n    return 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {}
    with pytest.raises(ImportError, match="f is exported by two modules"):
        _exports.collect("clash_pkg", [str(package)], namespace)
    for name in [n for n in sys.modules if n.startswith("clash_pkg")]:
        del sys.modules[name]


def test_a_submodule_of_the_same_name_is_replaced_by_its_function():
    assert not isinstance(reference.gae, types.ModuleType) and callable(reference.gae)
