"""Replacing a library's functions where its modules and registries hold them.

A function `f` defined in `lib.a` is also held by every module that did
`from lib.a import f`, and by any registry dict it was registered in; patching
only `lib.a.f` would miss those.  `FunctionPatch.apply` scans the loaded modules of
the package (and the given registries) for the original objects, swaps in the
replacements and remembers each swap; `restore` undoes exactly those swaps (and
leaves alone anything someone else has re-assigned since).  Modules imported after
`apply` copy the replacement from the patched defining module."""
from __future__ import annotations

import sys
from collections.abc import Mapping, MutableMapping


class FunctionPatch:
    """The replacements of one library, applied at most once until restored."""

    def __init__(self, package: str):
        self.package = package
        self._originals: dict[str, object] = {}
        # (module name or registry, its label, attribute or key, original, replacement)
        self._swaps: list[tuple[str | MutableMapping, str, object, object, object]] = []

    def original(self, name: str):
        """The library's own function `name`, as it was when `apply` ran."""
        return self._originals[name]

    @property
    def applied(self) -> list[str]:
        """`module.attribute` and `registry[key]` names of the swaps in place."""
        return [f"{label}.{key}" if isinstance(holder, str) else f"{label}[{key!r}]"
                for holder, label, key, _, _ in self._swaps]

    def apply(self, originals: Mapping[str, object], replacements: Mapping[str, object],
              registries: Mapping[str, MutableMapping] | None = None) -> list[str]:
        """Replaces `originals[name]` by `replacements[name]` in every loaded module of
        the package that holds it under that name and in every registry entry that is
        it; idempotent (a second call only reports).  Returns `applied`."""
        if self._swaps:
            return self.applied
        self._originals = dict(originals)
        prefix = self.package + "."
        for module_name, module in list(sys.modules.items()):
            if module is None or not (module_name == self.package or module_name.startswith(prefix)):
                continue
            namespace = vars(module)  # not getattr: lazy modules would import on a miss
            for name, original in self._originals.items():
                if namespace.get(name) is original:
                    setattr(module, name, replacements[name])
                    self._swaps.append((module_name, module_name, name, original, replacements[name]))
        by_id = {id(original): name for name, original in self._originals.items()}
        for label, registry in (registries or {}).items():
            for key, value in list(registry.items()):
                name = by_id.get(id(value))
                if name is not None:
                    registry[key] = replacements[name]
                    self._swaps.append((registry, label, key, value, replacements[name]))
        return self.applied

    def restore(self) -> None:
        """Puts back every original `apply` replaced, where the replacement still stands."""
        while self._swaps:
            holder, _, key, original, replacement = self._swaps.pop()
            if isinstance(holder, str):
                module = sys.modules.get(holder)
                if module is not None and vars(module).get(key) is replacement:
                    setattr(module, key, original)
            elif holder.get(key) is replacement:
                holder[key] = original
        # _originals stay: a replacement someone still holds keeps its fallbacks working
