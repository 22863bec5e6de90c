"""What every training algorithm receives, and how per-sample randomness is derived.

An algorithm turns one micro-batch (prompts, their conditioning, the rollout's clean latents and
the noise they came from) into a loss, calls ``backward`` on it (possibly several times, e.g. one
per branch, so activations are freed between them) and returns scalar metrics. It never steps
the optimizer and knows nothing about ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from ..models.base import Cond


def sample_rng(seed: int, step: int, index: int, stream: int = 0) -> np.random.Generator:
    """Randomness of one sample: a function of (seed, update, global sample index) only, never of
    how samples are laid out over ranks or micro-steps. ``stream`` separates independent uses."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, index, stream]))


def torch_seed(seed: int, step: int, index: int, stream: int) -> int:
    return int(sample_rng(seed, step, index, stream).integers(0, 2**62))


@dataclass
class Batch:
    prompts: list[str]
    cond: Cond
    x0: Tensor  # clean latents from the rollout (detached)
    eps: Tensor  # the noise x0 was rolled out from: the Direct-Align prior
    step: int  # update number
    indices: list[int]  # global sample indices
    pos_word: str = ""
    neg_word: str = ""
    loss_scale: float = 1.0  # 1 / (samples this process contributes to the update)
    extras: dict = field(default_factory=dict)


class Algorithm:
    """Base class; subclasses implement :meth:`backward`."""

    name = "base"
    needs_rollout = True  # False: the algorithm samples x0 itself

    def backward(self, model, batch: Batch) -> dict[str, float]:
        raise NotImplementedError
