"""Direct-Align with the absolute reward: SRPO's two branches and timesteps with SRP off.

The ablation "absolute instead of relative reward": the denoise branch ascends ``RM(x, prompt)``
and the inversion branch its negation (the same sign flip that swapping the control words makes).
Every other setting (``method.*``, hinge, weights) is SRPO's.
"""

from __future__ import annotations

from ..config import Config
from .base import RewardFn
from .srpo import SRPO


class DirectAlign(SRPO):
    name = "direct_align"

    def __init__(self, cfg: Config, reward_fn: RewardFn):
        super().__init__(cfg, reward_fn.absolute_only())
