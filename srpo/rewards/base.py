"""The Reward contract.

A reward scores images in [0, 1] (shape [B, 3, H, W]) against prompts, differentiably in the
images. Text-conditioned rewards are dot products of unit-normalised features times a scale::

    score(x, c) = scale * encode_image(x) . encode_text(c)

so the semantic-relative reward is one dot product against cached text features. Image-only
rewards (``text_conditioned = False``) implement only :meth:`score`; SRP does not apply to them
and the trainer falls back to plain Direct-Align on the absolute score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..registry import Registry

REWARDS = Registry("reward")  # name -> factory(path=..., device=..., **options) -> Reward


@dataclass(frozen=True)
class RewardPlan:
    """What ``srpo plan`` needs of a reward model (a reward reports its own, as a model family's
    ``plan_parts`` does): parameters and its vision tower's depth, width and tokens."""

    params: int
    layers: int  # vision transformer layers (each keeps ~26 tokens x width tensors for backward)
    width: int
    tokens: int
    tower: int = 0  # parameters of the image tower FSDP shards (Reward.image_tower; 0: none is)


# open_clip / CLIP ViT-H-14 (HPSv2.1, PickScore) and ViT-L/14 (CLIP score, the aesthetic predictor's
# tower): all parameters, then the image tower's (counted on the meta device)
VIT_H_14 = RewardPlan(986_109_441, 32, 1280, 257, tower=632_076_800)
VIT_L_14 = RewardPlan(427_616_513, 24, 1024, 257, tower=303_966_208)


def plan_sizes(sizes):
    """Decorator for a reward factory: ``sizes`` is its :class:`RewardPlan`, or a function of the
    reward's options returning one; ``srpo plan`` reads it as ``factory.plan_sizes(options)``."""

    def deco(factory):
        factory.plan_sizes = sizes if callable(sizes) else (lambda options: sizes)
        return factory

    return deco


def starter(title: str, file: str | None, needs: str, options: dict | None = None, options_note: str = ""):
    """Decorator for a reward factory: what ``srpo init`` writes of it (``factory.starter``): its
    title, the checkpoint's file name (``None``: it takes no path), what the path must hold and
    where users get it, and its path options (file names) with a note on them."""

    def deco(factory):
        factory.starter = {"title": title, "file": file, "needs": needs, "options": dict(options or {}),
                           "options_note": options_note}
        return factory

    return deco


class Reward(nn.Module):
    text_conditioned: bool = True
    scale: float = 1.0  # multiplier on the cosine (HPS: 1; CLIP / PickScore: logit_scale.exp() / 20)

    def encode_image(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] unit-normalised features (differentiable)."""
        raise NotImplementedError

    def _encode_text_uncached(self, prompts: list[str]) -> Tensor:
        """N prompts -> [N, D] unit-normalised features (no cache; subclasses implement this)."""
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> Tensor:
        """N prompts -> [N, D] unit-normalised features, cached per prompt (they are constants)."""
        if not hasattr(self, "_text_cache"):
            self._text_cache: dict[str, Tensor] = {}
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            for p, f in zip(missing, self._encode_text_uncached(missing)):
                self._text_cache[p] = f
        device = next(self.parameters()).device
        return torch.stack([self._text_cache[p].to(device) for p in prompts])

    def clear_cache(self) -> None:
        self._text_cache = {}

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Absolute reward per image, [B]."""
        f_img = self.encode_image(images)
        f_txt = self.encode_text(prompts).to(f_img)
        return self.scale * (f_img * f_txt).sum(-1)

    def image_tower(self) -> tuple[nn.Module, list[nn.Module]] | None:
        """The image tower as (the module its forward calls, its repeated blocks), for
        ``parallel.shard_reward``: a tower every rank calls alike (once per scored batch), so
        FSDP can shard it. None (the default): nothing of this reward is sharded."""
        return None

    def frozen(self) -> "Reward":
        """Eval mode, no parameter gradients (gradients still flow to the input images)."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self
