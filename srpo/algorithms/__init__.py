"""Training algorithms: a registry of factories ``factory(cfg, reward_fn) -> Algorithm``."""

from ..registry import Registry
from .base import RewardFn  # noqa: F401  (re-exported: srpo.rewards.objective.RewardFn)
from .srpo import SRPO

ALGORITHMS = Registry("algorithm")
ALGORITHMS.register("srpo")(SRPO)

from .direct_align import DirectAlign  # noqa: E402
from .draft import DRaFT  # noqa: E402
from .grpo import GRPO  # noqa: E402
from .refl import ReFL  # noqa: E402

for _cls in (DirectAlign, ReFL, DRaFT, GRPO):
    ALGORITHMS.register(_cls.name)(_cls)
