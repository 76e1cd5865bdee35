"""Packages that export what their family modules declare: a family module lists its
public names in `__all__`, and the package picks them up, so adding a family adds no
line to the package's __init__."""
from __future__ import annotations

import importlib
import pkgutil
import types


def collect(package: str, path, namespace: dict) -> list[str]:
    """Imports every module of `package` whose name does not start with "_" (in name
    order), puts the names in its `__all__` into `namespace`, and returns them."""
    names: list[str] = []
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        for name in module.__all__:
            value, existing = getattr(module, name), namespace.get(name)
            # a submodule of the same name (gae.gae) is what the function replaces
            if existing is not None and not isinstance(existing, types.ModuleType) and existing is not value:
                raise ImportError(f"{package}: {name} is exported by two modules")
            namespace[name] = value
            names.append(name)
    return names
