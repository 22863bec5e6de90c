"""A tiny random-weight CLIP reward built in code, for tests and the tiny config (no download)."""

from __future__ import annotations

import os

import torch

from .base import REWARDS, RewardPlan, plan_sizes
from .clip import CLIPReward
from .preprocess import ImageTransform


def tiny_clip_config(image_size: int = 32):
    """A small real ``CLIPConfig``: 2-layer ViT (patch 8) and 2-layer text tower, width 32."""
    from transformers import CLIPConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **common),
        vision_config=dict(image_size=image_size, patch_size=8, **common),
        projection_dim=32,
    )


def tiny_clip_processor(image_size: int = 32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})


def tiny_clip_model(seed: int = 0, image_size: int = 32):
    """A random-weight ``CLIPModel``; the same seed gives the same weights."""
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(tiny_clip_config(image_size)).eval()


def plan(options: dict) -> RewardPlan:
    """The tiny CLIP's sizes at its ``image_size`` option, counted on the meta device."""
    from transformers import CLIPModel

    config = tiny_clip_config(int(options.get("image_size", 32)))
    vc = config.vision_config
    with torch.device("meta"):
        model = CLIPModel(config)
    n, tower = (sum(p.numel() for p in m.parameters()) for m in (model, model.vision_model))
    return RewardPlan(n, vc.num_hidden_layers, vc.hidden_size, (vc.image_size // vc.patch_size) ** 2 + 1, tower=tower)


@REWARDS.register("tiny_clip")
@plan_sizes(plan)
def build_tiny_clip(path=None, seed: int = 0, device=None, image_size: int = 32,
                    divide_by: float = 20.0, uint8: str | None = "auto") -> CLIPReward:
    """The tiny CLIP reward with random weights from ``seed`` (``path`` is ignored)."""
    from ..tokenizer import clip_tokenizer

    model = tiny_clip_model(seed, image_size)
    transform = ImageTransform.from_clip_processor(tiny_clip_processor(image_size), uint8=uint8)
    reward = CLIPReward(model, transform, clip_tokenizer(), divide_by=divide_by)
    return reward.to(device) if device is not None else reward


def save_tiny_clip(path, seed: int = 0, image_size: int = 32) -> str:
    """Write the tiny CLIP as a transformers folder (model, image processor, tokenizer)."""
    from ..tokenizer import clip_tokenizer

    os.makedirs(path, exist_ok=True)
    tiny_clip_model(seed, image_size).save_pretrained(path)
    tiny_clip_processor(image_size).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    return str(path)
