"""The reward function training optimises, on a built (frozen) reward model: semantic-relative
(SRP) when ``srp.enabled``, else the absolute score, under ``train.reward_autocast``. The
trainer, the benchmarks and the lab build it here, one way."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from ..precision import AUTOCAST, autocast as autocast_context
from .srp import SRP


def reward_autocast(cfg) -> str:
    """``train.reward_autocast``; auto: fp16 when the model autocasts (the reference), else none."""
    ra = cfg.train.reward_autocast
    return ra if ra != "auto" else ("fp16" if cfg.train.autocast != "none" else "none")


def reward_frames(spec) -> int | list[int]:
    """``reward.frames``: one setting for a list of mixed rewards (they score the same frames)."""
    values = [s.frames for s in spec] if isinstance(spec, list) else [spec.frames]
    if any(v != values[0] for v in values):
        raise UserError(f"reward.frames differs between the mixed rewards ({', '.join(map(str, values))}): "
                        f"give them one setting, they score the same frames")
    return values[0]


def frame_indices(frames: int | list[int], count: int) -> list[int]:
    """Which of a video's ``count`` frames the reward scores: ``frames`` evenly spaced (first and
    last included; all when the video has fewer), or the listed indices (negative from the end)."""
    if isinstance(frames, int):
        n = min(frames, count)
        return [0] if n == 1 else [round(i * (count - 1) / (n - 1)) for i in range(n)]
    bad = [i for i in frames if not -count <= i < count]
    if bad:
        raise UserError(f"reward.frames {list(frames)} names frame {bad[0]}, but the videos have {count} frames")
    return [i % count for i in frames]


def reward_function(cfg, reward, srp: bool | None = None, precision: str | None = None) -> "RewardFn":
    """The config's reward function on ``reward``: SRP with the config's control words and
    template when ``srp`` (default ``srp.enabled``), under ``precision`` (default
    :func:`reward_autocast`), scoring ``reward.frames`` of each video."""
    srp = cfg.srp.enabled if srp is None else srp
    helper = SRP(reward, cfg.srp.pos_words, cfg.srp.neg_words, template=cfg.srp.template) if srp else None
    return RewardFn(reward, helper, reward_autocast(cfg) if precision is None else precision,
                    frames=reward_frames(cfg.reward))


class RewardFn:
    """Reward of decoded images: semantic-relative when an SRP helper is given, else absolute;
    the reward model runs under ``autocast`` (``none`` | ``bf16`` | ``fp16``), here and only here.

    ``swap`` exchanges the roles of the positive and negative words (inversion branch); without
    SRP the absolute reward is negated instead, the same sign flip."""

    def __init__(self, reward, srp=None, autocast: str = "none", frames: int | list[int] = 4):
        self.reward, self.srp, self.frames = reward, srp, frames
        self.autocast_dtype = AUTOCAST[autocast]

    def absolute_only(self) -> "RewardFn":
        """The same reward, precision and frames without SRP."""
        out = RewardFn(self.reward, None, frames=self.frames)
        out.autocast_dtype = self.autocast_dtype
        return out

    def precision(self, images: Tensor):
        return autocast_context(images.device.type, self.autocast_dtype)

    def as_images(self, images: Tensor, prompts: list[str], *per_sample):
        """Videos ``[B, F, 3, H, W]`` -> their scored frames as images ``[B n, 3, H, W]`` with each
        prompt (and each per-sample tensor) repeated n times, and n; images pass as they are (n = 1)."""
        if images.ndim != 5:
            return images, prompts, per_sample, 1
        idx = frame_indices(self.frames, images.shape[1])
        n = len(idx)
        frames = images[:, idx].flatten(0, 1)
        rows = tuple(v.repeat_interleave(n, 0) if torch.is_tensor(v) and v.ndim else v for v in per_sample)
        return frames, [p for p in prompts for _ in range(n)], rows, n

    @staticmethod
    def per_video(values: Tensor, n: int) -> Tensor:
        """Per-frame scores ``[B n]`` -> their mean per video ``[B]``."""
        return values if n == 1 or not torch.is_tensor(values) else values.reshape(-1, n).mean(1)

    def absolute(self, images: Tensor, prompts: list[str]) -> Tensor:
        images, prompts, _, n = self.as_images(images, prompts)
        with self.precision(images):
            return self.per_video(self.reward.score(images, prompts).float(), n)

    def relative(self, images: Tensor, prompts: list[str], pos: str, neg: str, k):
        """The SRP scores of images or of videos' scored frames (averaged per video)."""
        images, prompts, (k,), n = self.as_images(images, prompts, k)
        with self.precision(images):
            out = self.srp.relative(images, prompts, pos, neg, k)
        if n == 1:
            return out
        return type(out)(*(self.per_video(v, n) for v in (out.relative, out.pos, out.neg)),
                         {name: self.per_video(v, n) for name, v in out.terms.items()})

    def __call__(self, images, prompts, pos, neg, k, swap: bool):
        if self.srp is None:
            r = self.absolute(images, prompts)
            return (-r if swap else r), {}
        if swap:
            pos, neg = neg, pos
        out = self.relative(images, prompts, pos, neg, k)
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
