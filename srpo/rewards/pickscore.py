"""PickScore: a CLIP-H (transformers ``CLIPModel``) fine-tuned on Pick-a-Pic preferences.

Its own score is ``logit_scale.exp() * cos`` (about 100 * cos); SRPO divides it by 20 to bring
it near HPS's raw cosine, so in srpo's contract ``scale = logit_scale.exp() / 20`` and
``score`` returns PickScore / 20 (``divide_by`` changes the 20).
"""

from __future__ import annotations

from .base import REWARDS, VIT_H_14, plan_sizes
from .clip import CLIPReward


@REWARDS.register("pickscore")
@plan_sizes(VIT_H_14)
def pickscore(path=None, device=None, processor_path=None, dtype=None, divide_by: float = 20.0,
              uint8: str | None = "auto") -> CLIPReward:
    """``path``: the PickScore_v1 model folder; ``processor_path``: the CLIP-H processor folder
    (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) if the model folder has no processor files
    (without one, CLIP's defaults at the model's input size are used: the same values)."""
    return CLIPReward.from_pretrained(path, processor_path=processor_path, device=device, dtype=dtype,
                                      divide_by=divide_by, uint8=uint8, what="PickScore reward")
