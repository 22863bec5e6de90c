"""HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences, scored as the raw cosine.

The checkpoint is ``HPS_v2.1_compressed.pt`` (a dict with a ``state_dict``), read with
``weights_only=True``; the PyPI ``hpsv2`` package is not needed. Images are preprocessed as
HPSv2 scores them: longer side resized to 224 (bicubic), zero-padded to a square, normalised.
"""

from __future__ import annotations

from .base import REWARDS, VIT_H_14, plan_sizes
from .openclip import OpenCLIPReward


@REWARDS.register("hps")
@plan_sizes(VIT_H_14)
def hps(path=None, device=None, arch: str = "ViT-H-14", dtype=None, resize_mode: str = "longest",
        uint8: str | None = "pil") -> OpenCLIPReward:
    """HPSv2.1 reward (``scale = 1``). ``arch``: an open_clip name or JSON config (tests use a
    tiny one); ``resize_mode``: "longest" (HPSv2's padding) or "shortest" (centre crop)."""
    return OpenCLIPReward.from_checkpoint(path, arch=arch, device=device, dtype=dtype, uint8=uint8,
                                          resize_mode=resize_mode, divide_by=None, what="HPS reward")


def random_hps(arch: str = "ViT-H-14", device=None, dtype=None, uint8: str | None = None) -> OpenCLIPReward:
    """HPSv2.1's architecture, preprocessing and scoring with random weights (benchmarks at real
    size; ``uint8=None``: the float transform, as :func:`hps` gets it in training)."""
    return OpenCLIPReward.build(arch, device=device, dtype=dtype, resize_mode="longest", uint8=uint8,
                                divide_by=None)
