"""The LAION "improved aesthetic predictor": an MLP head over CLIP ViT-L/14 image features.

``score = MLP(f_img / |f_img|)`` (about 1-10). Image-only: SRP does not apply (there are no
text features to take a difference of); train it with ``srp.enabled: false`` (plain
Direct-Align on the absolute score), or mix it into a text-conditioned reward.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import REWARDS, VIT_L_14, Reward, RewardPlan, plan_sizes
from .openclip import check_fit, load_state_dict


class AestheticHead(nn.Module):
    """Linear(d,1024)-Dropout-Linear(1024,128)-Dropout-Linear(128,64)-Dropout-Linear(64,16)-Linear(16,1),
    with the predictor's state-dict names ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7``."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class AestheticReward(Reward):
    """Image-only reward: the head over a CLIP reward's unit image features."""

    text_conditioned = False
    scale = 1.0

    def __init__(self, clip: Reward, head: AestheticHead):
        super().__init__()
        self.clip = clip
        self.head = head
        self.frozen()

    def encode_image(self, images: Tensor) -> Tensor:
        return self.clip.encode_image(images)

    def encode_text(self, prompts: list[str]) -> Tensor:
        raise UserError("the aesthetic reward is image-only: it has no text features (SRP does not apply)")

    def score(self, images: Tensor, prompts: list[str] | None = None) -> Tensor:
        f = self.encode_image(images)
        head_dtype = self.head.layers[0].weight.dtype
        return self.head(f.to(head_dtype)).squeeze(-1).float()


def load_head(path, dim: int, sd: dict | None = None) -> AestheticHead:
    """The head's weights (``.pth`` state dict, weights only, or ``.safetensors``)."""
    sd = load_state_dict(path, "aesthetic reward") if sd is None else sd
    head = AestheticHead(dim)
    check_fit(head, sd, Path(path).expanduser(),
              f"the improved-aesthetic-predictor MLP over {dim}-d CLIP features (layers.0 ... layers.7)")
    head.load_state_dict(sd)
    return head


@REWARDS.register("aesthetic")
@plan_sizes(RewardPlan(VIT_L_14.params + 1_000_000, VIT_L_14.layers, VIT_L_14.width, VIT_L_14.tokens,
                       tower=VIT_L_14.tower))
def aesthetic(path=None, device=None, clip_path=None, arch: str = "ViT-L-14", dtype=None,
              uint8: str | None = "pil") -> AestheticReward:
    """``path``: the head (e.g. ``sac+logos+ava1-l14-linearMSE.pth``); ``clip_path``: CLIP
    ViT-L/14, a transformers folder (openai/clip-vit-large-patch14) or an open_clip checkpoint
    file of ``arch``. Preprocessing as OpenAI CLIP's on PIL images (bicubic, 8-bit)."""
    from .clip import CLIPReward
    from .openclip import OpenCLIPReward

    sd = load_state_dict(path, "aesthetic reward")  # check the small file before loading CLIP
    if clip_path is None:
        raise UserError("the aesthetic reward needs options.clip_path: a CLIP ViT-L/14 folder "
                        "(openai/clip-vit-large-patch14) or open_clip checkpoint file")
    if Path(clip_path).expanduser().is_file():
        clip = OpenCLIPReward.from_checkpoint(clip_path, arch=arch, uint8=uint8, what="aesthetic CLIP")
        dim = int(clip.model.visual.output_dim)
    else:
        clip = CLIPReward.from_pretrained(clip_path, uint8=uint8, what="aesthetic CLIP")
        clip.transform = dataclasses.replace(clip.transform, crop_rounding="round")  # torchvision's crop
        dim = int(clip.model.config.projection_dim)
    reward = AestheticReward(clip, load_head(path, dim, sd))
    if dtype is not None:
        reward = reward.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return reward.to(device) if device is not None else reward
