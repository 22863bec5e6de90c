"""Model adapters: a registry of FlowModel factories (name or dotted path)."""

from ..registry import Registry

MODELS = Registry("model")
