"""What every training algorithm receives, and the reward it asks.

An algorithm turns one micro-batch (prompts, their conditioning, the rollout's clean latents and
the noise they came from) into a loss, calls ``backward`` on it (possibly several times, e.g. one
per branch, so activations are freed between them) and returns scalar metrics. It never steps
the optimizer and knows nothing about ranks or model families: noise levels come from the
model's own schedule, precision from the model's ``velocity``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import UserError
from ..models.base import AUTOCAST, Cond


@dataclass
class Batch:
    prompts: list[str]
    cond: Cond
    x0: Tensor | None  # clean latents from the rollout (detached); None if the algorithm samples itself
    eps: Tensor  # the noise x0 was rolled out from: the Direct-Align prior
    step: int  # update number
    indices: list[int]  # global sample indices
    pos_word: str = ""
    neg_word: str = ""
    loss_scale: float = 1.0  # 1 / (samples this process contributes to the update)
    extras: dict = field(default_factory=dict)


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
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=images.device.type, dtype=self.autocast_dtype)

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

    def baseline(self, mode: str, images: Tensor, batch: Batch, prompts=None) -> Tensor:
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


def levels(values, like: Tensor) -> Tensor:
    """Per-sample levels as a ``[B]`` float32 tensor on ``like``'s device."""
    return torch.tensor([float(v) for v in values], device=like.device, dtype=torch.float32)


class Algorithm:
    """Base class; subclasses implement :meth:`backward`."""

    name = "base"
    needs_rollout = True  # False: the algorithm samples x0 itself

    def backward(self, model, batch: Batch) -> dict[str, float]:
        raise NotImplementedError
