"""Semantic-Relative Preference: a reward relative to a pair of control words.

For a dot-product reward ``RM(x, c) = scale * f_img(x) . f_txt(c)`` and control texts
``pos = "<pos word>. <prompt>"``, ``neg = "<neg word>. <prompt>"``::

    relative = scale * f_img . ((1 + k) f_txt(pos) - f_txt(neg))
             = (1 + k) RM(x, pos) - RM(x, neg)

Text features are cached per text: one image forward scores both words. SRP needs a
text-conditioned reward; image-only rewards train with plain Direct-Align on the absolute score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import UserError
from ..method import srp_text_direction
from .base import Reward

DEFAULT_POS_WORDS = ("Natural-lighting", "Detail", "Detailed", "Real")
DEFAULT_NEG_WORDS = ("Concept art", "Painting", "Anime", "Flat", "Oil")


@dataclass
class SRPScores:
    """Per-image SRP reward [B] and its two parts, for the loss and for logging."""

    relative: Tensor  # (1 + k) * pos - neg (differentiable)
    pos: Tensor  # scale * f_img . f_txt(pos text)
    neg: Tensor  # scale * f_img . f_txt(neg text)
    terms: dict[str, Tensor] = field(default_factory=dict)  # per-term values of a mixed reward


def reward_name(reward) -> str:
    return getattr(reward, "name", None) or type(reward).__name__


def require_text_conditioned(reward) -> None:
    if not getattr(reward, "text_conditioned", True):
        raise UserError(
            f"SRP needs a text-conditioned reward, but {reward_name(reward)} scores images only: "
            "set srp.enabled: false to train with plain Direct-Align on its absolute score"
        )


class SRP:
    """Control words + cached text features -> semantic-relative reward of a Reward."""

    def __init__(self, reward: Reward, pos_words=DEFAULT_POS_WORDS, neg_words=DEFAULT_NEG_WORDS,
                 template: str = "{word}. {prompt}"):
        require_text_conditioned(reward)
        if isinstance(pos_words, str) or isinstance(neg_words, str):
            raise UserError("SRP control words must be lists of words, e.g. pos_words: [Real]")
        if not pos_words or not neg_words:
            raise UserError("SRP needs at least one positive and one negative control word")
        if "{word}" not in template or "{prompt}" not in template:
            raise UserError(f"SRP template {template!r} must contain {{word}} and {{prompt}}")
        self.reward = reward
        self.pos_words = tuple(pos_words)
        self.neg_words = tuple(neg_words)
        self.template = template
        self._cache: dict[str, Tensor] = {}

    def texts(self, word: str, prompts: list[str]) -> list[str]:
        return [self.template.format(word=word, prompt=p) for p in prompts]

    def features(self, word: str, prompts: list[str]) -> Tensor:
        """[N, D] unit text features of ``word`` + each prompt, encoded once per text."""
        texts = self.texts(word, prompts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with torch.no_grad():
                feats = self.reward.encode_text(missing)
            for t, f in zip(missing, feats):
                self._cache[t] = f.detach()
        return torch.stack([self._cache[t] for t in texts])

    def relative(self, images: Tensor, prompts: list[str], pos_word: str, neg_word: str,
                 k: Tensor | float = 0.0) -> SRPScores:
        """SRP reward of ``images`` [B, 3, H, W] in [0, 1] for ``prompts`` (len B)."""
        if hasattr(self.reward, "srp_relative"):  # a mix: text terms relative, image-only absolute
            return self.reward.srp_relative(self, images, prompts, pos_word, neg_word, k)
        f_img = self.reward.encode_image(images)
        f_pos = self.features(pos_word, prompts).to(f_img)
        f_neg = self.features(neg_word, prompts).to(f_img)
        if isinstance(k, Tensor):
            k = k.to(f_img)
        scale = self.reward.scale
        relative = scale * (f_img * srp_text_direction(f_pos, f_neg, k)).sum(-1)
        pos = scale * (f_img * f_pos).sum(-1)
        neg = scale * (f_img * f_neg).sum(-1)
        return SRPScores(relative, pos, neg)

    def clear_cache(self) -> None:
        self._cache.clear()
