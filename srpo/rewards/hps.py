"""HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences, scored as the raw cosine.

The checkpoint is ``HPS_v2.1_compressed.pt`` (a dict with a ``state_dict``), read with
``weights_only=True``; the PyPI ``hpsv2`` package is not needed. Images are preprocessed as
HPSv2 scores them: longer side resized to 224 (bicubic), zero-padded to a square, normalised.
"""

from __future__ import annotations

from . import REWARDS
from .openclip import OpenCLIPReward


@REWARDS.register("hps")
def hps(path=None, device=None, arch: str = "ViT-H-14", dtype=None, resize_mode: str = "longest",
        uint8: str | None = "pil") -> OpenCLIPReward:
    """HPSv2.1 reward (``scale = 1``). ``arch``: an open_clip name or JSON config (tests use a
    tiny one); ``resize_mode``: "longest" (HPSv2's padding) or "shortest" (centre crop)."""
    return OpenCLIPReward.from_checkpoint(path, arch=arch, device=device, dtype=dtype, divide_by=None,
                                          resize_mode=resize_mode, uint8=uint8, what="HPS reward")
