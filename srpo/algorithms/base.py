"""What every training algorithm receives (the reward function it asks is
:class:`srpo.rewards.objective.RewardFn`).

An algorithm turns one micro-batch (prompts, their conditioning, the rollout's clean latents and
the noise they came from) into a loss, calls ``backward`` on it (possibly several times, e.g. one
per branch, so activations are freed between them) and returns scalar metrics. Before the forward
of each pass with gradient it calls ``batch.begin_pass(last)`` (``last``: its last pass on this
micro-batch), so the update reduces gradients over ranks once, in the last backward; an algorithm
that does not call it reduces in every backward, as it would without it. It never steps
the optimizer and knows nothing about ranks or model families: noise levels come from the
model's own schedule, precision from the model's ``velocity``.
"""

from __future__ import annotations

from collections.abc import Callable
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
    final: bool = True  # the update's last micro-batch
    sync: Callable[[bool], None] | None = None  # the update's parallel.GradSync (set by step.update)

    def begin_pass(self, last: bool) -> None:
        """Before the forward of a pass with gradient: its backward reduces gradients over ranks
        only when it is the last pass (``last``) of the update's last micro-batch; the passes before
        accumulate locally."""
        if self.sync is not None:
            self.sync(last and self.final)


def levels(values, like: Tensor) -> Tensor:
    """Per-sample levels as a ``[B]`` float32 tensor on ``like``'s device."""
    return torch.tensor([float(v) for v in values], device=like.device, dtype=torch.float32)


class Algorithm:
    """Base class; subclasses implement :meth:`backward`."""

    name = "base"
    needs_rollout = True  # False: the algorithm samples x0 itself

    def backward(self, model, batch: Batch) -> dict[str, float]:
        raise NotImplementedError
