"""The only module that knows about processes, ranks and distributed wrappers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def setup(cfg) -> Context:
    return Context(0, 1, pick_device(cfg.train.device))


def all_mean(values: dict[str, float], ctx: Context) -> dict[str, float]:
    """Mean of scalar metrics over ranks."""
    return values


def barrier(ctx: Context) -> None:
    pass


def teardown(ctx: Context) -> None:
    pass


def apply(model, cfg, ctx: Context) -> None:
    """Wrap ``model.transformer`` for the configured parallel strategy (in place)."""


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)
