"""Name -> factory registries that fall back to dotted Python paths (``my_pkg.MyReward``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .errors import UserError


def _where(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', repr(obj)))}"


class Registry:
    """``kind`` names what it holds in messages; ``name_attr``: a registered class that does not set
    this attribute itself gets its registered name there (a family's ``family``)."""

    def __init__(self, kind: str, name_attr: str | None = None):
        self.kind = kind
        self.name_attr = name_attr
        self._items: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(obj):
            if name in self._items and self._items[name] is not obj:
                raise UserError(f"{self.kind} '{name}' is registered already (by {_where(self._items[name])}); "
                                f"register {_where(obj)} under another name, or name it by its dotted path")
            self._items[name] = obj
            if self.name_attr and isinstance(obj, type) and self.name_attr not in vars(obj):
                setattr(obj, self.name_attr, name)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Callable:
        if name in self._items:
            return self._items[name]
        if "." in name:
            module, _, attr = name.rpartition(".")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise UserError(f"cannot import {self.kind} '{name}': {e}") from None
        raise UserError(
            f"unknown {self.kind} '{name}': use one of {', '.join(self.names())} "
            f"or a dotted Python path such as my_pkg.module.Factory"
        )
