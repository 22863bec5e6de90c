"""Precision names, in one place: the ``none | bf16 | fp16`` of ``train.autocast`` and
``train.reward_autocast`` and the autocast context they open (model calls and reward calls)."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device_type``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
