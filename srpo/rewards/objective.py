"""The reward function training optimises, on a built (frozen) reward model: semantic-relative
(SRP) when ``srp.enabled``, else the absolute score, under ``train.reward_autocast``. The
trainer, the benchmarks and the lab build it here, one way."""

from __future__ import annotations

from torch import Tensor

from ..errors import UserError
from ..precision import AUTOCAST, autocast as autocast_context
from .srp import SRP


def reward_autocast(cfg) -> str:
    """``train.reward_autocast``; auto: fp16 when the model autocasts (the reference), else none."""
    ra = cfg.train.reward_autocast
    return ra if ra != "auto" else ("fp16" if cfg.train.autocast != "none" else "none")


def reward_function(cfg, reward, srp: bool | None = None, precision: str | None = None) -> "RewardFn":
    """The config's reward function on ``reward``: SRP with the config's control words and
    template when ``srp`` (default ``srp.enabled``), under ``precision`` (default
    :func:`reward_autocast`)."""
    srp = cfg.srp.enabled if srp is None else srp
    helper = SRP(reward, cfg.srp.pos_words, cfg.srp.neg_words, template=cfg.srp.template) if srp else None
    return RewardFn(reward, helper, reward_autocast(cfg) if precision is None else precision)


class RewardFn:
    """Reward of decoded images: semantic-relative when an SRP helper is given, else absolute;
    the reward model runs under ``autocast`` (``none`` | ``bf16`` | ``fp16``), here and only here.

    ``swap`` exchanges the roles of the positive and negative words (inversion branch); without
    SRP the absolute reward is negated instead, the same sign flip."""

    def __init__(self, reward, srp=None, autocast: str = "none"):
        self.reward, self.srp = reward, srp
        self.autocast_dtype = AUTOCAST[autocast]

    def absolute_only(self) -> "RewardFn":
        """The same reward and precision without SRP."""
        out = RewardFn(self.reward, None)
        out.autocast_dtype = self.autocast_dtype
        return out

    def precision(self, images: Tensor):
        return autocast_context(images.device.type, self.autocast_dtype)

    def absolute(self, images: Tensor, prompts: list[str]) -> Tensor:
        with self.precision(images):
            return self.reward.score(images, prompts).float()

    def __call__(self, images, prompts, pos, neg, k, swap: bool):
        if self.srp is None:
            r = self.absolute(images, prompts)
            return (-r if swap else r), {}
        if swap:
            pos, neg = neg, pos
        with self.precision(images):
            out = self.srp.relative(images, prompts, pos, neg, k)
        parts = {"pos": out.pos.mean().item(), "neg": out.neg.mean().item()}
        parts.update({f"term/{name}": v.mean().item() for name, v in out.terms.items()})
        return out.relative.float(), parts

    def baseline(self, mode: str, images: Tensor, batch, prompts=None) -> Tensor:
        """Per-image reward ``[B]`` of a baseline: the absolute score, or the SRP paper form
        ``RM(pos) - RM(neg)`` with the update's words."""
        prompts = batch.prompts if prompts is None else prompts
        if mode == "absolute":
            return self.absolute(images, prompts)
        r, _ = self(images, prompts, batch.pos_word, batch.neg_word, 0.0, False)
        return r

    def check_mode(self, mode: str, section: str) -> None:
        """A relative baseline reward needs the SRP helper the trainer builds when srp.enabled."""
        if mode == "relative" and self.srp is None:
            raise UserError(f"{section}.reward is 'relative' but srp.enabled is false: set srp.enabled true "
                            f"(with a text-conditioned reward) or {section}.reward to absolute")
