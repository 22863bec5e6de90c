"""Name -> factory registries that fall back to dotted Python paths (``my_pkg.MyReward``)."""

from __future__ import annotations

import importlib
from typing import Callable

from .errors import UserError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(obj):
            self._items[name] = obj
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
