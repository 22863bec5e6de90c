"""Training algorithms: a registry of factories ``factory(cfg, reward_fn) -> Algorithm``."""

from ..registry import Registry
from .srpo import SRPO, RewardFn

ALGORITHMS = Registry("algorithm")
ALGORITHMS.register("srpo")(SRPO)
