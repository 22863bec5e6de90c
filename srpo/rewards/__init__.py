"""Reward models: a registry of Reward factories (name or dotted path)."""

from .base import REWARDS  # noqa: F401

# Register the built-in rewards (these modules import only torch at import time).
from . import aesthetic, clip, hps, pickscore, tiny  # noqa: E402,F401
from . import hpsv3, hpsv3_tiny, imagereward, imagereward_tiny  # noqa: E402,F401
