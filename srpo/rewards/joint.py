"""Rewards that read image and text together (a cross-encoder: ImageReward's BERT cross-attends
to the image, HPSv3's language model reads image tokens and prompt in one sequence).

Their score is no dot product of separate features, so SRP cannot cache text features; it
encodes the image once and runs the joint part for both control texts::

    relative = (1 + k) * RM(x, pos) - RM(x, neg)

which is the same training form as for dot-product rewards (``srpo.method.srp_text_direction``).
``encode_image`` returns pooled, unit-normalised image features, for the guard's diversity only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from .base import Reward
from .srp import SRPScores


class JointReward(Reward):
    """Subclasses implement :meth:`image_features` (differentiable), :meth:`joint_score` and
    :meth:`pooled`."""

    text_conditioned = True
    scale = 1.0  # multiplier on the model's own score (``divide_by`` sets 1 / d)

    def image_features(self, images: Tensor):
        """[B, 3, H, W] in [0, 1] -> what :meth:`joint_score` reads of the images (per image)."""
        raise NotImplementedError

    def joint_score(self, feats, prompts: list[str]) -> Tensor:
        """The model's own score [len(prompts)] of image features ``feats`` against ``prompts``."""
        raise NotImplementedError

    def pooled(self, feats) -> Tensor:
        """[B, D] pooled image features."""
        raise NotImplementedError

    def repeat(self, feats, n: int):
        """``feats`` of B images repeated n times along the batch (image i at i, B + i, ...)."""
        return torch.cat([feats] * n) if n > 1 else feats

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.scale * self.joint_score(self.image_features(images), list(prompts))

    def encode_image(self, images: Tensor) -> Tensor:
        f = self.pooled(self.image_features(images))
        return torch.nn.functional.normalize(f.float(), dim=-1)

    def _encode_text_uncached(self, prompts: list[str]) -> Tensor:
        raise UserError(f"{type(self).__name__} scores image and text jointly: it has no text features "
                        "(use score(), or SRP, which runs the joint model for both control texts)")

    def srp_relative(self, srp, images: Tensor, prompts: list[str], pos_word: str, neg_word: str,
                     k: Tensor | float = 0.0) -> SRPScores:
        """SRP of a joint reward: one image forward, the joint part for both texts in one batch."""
        feats = self.image_features(images)
        texts = srp.texts(pos_word, prompts) + srp.texts(neg_word, prompts)
        both = self.scale * self.joint_score(self.repeat(feats, 2), texts)
        pos, neg = both[: len(prompts)], both[len(prompts):]
        if isinstance(k, Tensor):
            k = k.to(pos)
        return SRPScores((1 + k) * pos - neg, pos, neg)
