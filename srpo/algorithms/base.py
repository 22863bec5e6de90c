"""What every training algorithm receives (the reward function it asks is
:class:`srpo.rewards.objective.RewardFn`).

An algorithm turns one micro-batch (prompts, their conditioning, the rollout's clean latents and
the noise they came from) into a loss, calls ``backward`` on it (possibly several times, e.g. one
per branch, so activations are freed between them) and returns scalar metrics. It never steps
the optimizer and knows nothing about ranks or model families: noise levels come from the
model's own schedule, precision from the model's ``velocity``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.base import Cond
from ..rewards.objective import RewardFn  # noqa: F401  (the reward function algorithms receive)


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


def levels(values, like: Tensor) -> Tensor:
    """Per-sample levels as a ``[B]`` float32 tensor on ``like``'s device."""
    return torch.tensor([float(v) for v in values], device=like.device, dtype=torch.float32)


class Algorithm:
    """Base class; subclasses implement :meth:`backward`."""

    name = "base"
    needs_rollout = True  # False: the algorithm samples x0 itself

    def backward(self, model, batch: Batch) -> dict[str, float]:
        raise NotImplementedError
