"""Model adapters: a registry of FlowModel factories (name or dotted path)."""

from ..registry import Registry

MODELS = Registry("model")

from . import flux, tiny  # noqa: F401,E402  (register the built-in adapters)
