"""ReFL (ImageReward, Xu et al. 2023): denoise without gradient to a random late step of the
sampling chain, take one model step with gradient, score the one-step prediction ``x_t - t v``.

Also the helper the other chain baselines share: a partial no-grad Euler rollout on the model's
own schedule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import method as M
from .. import seeding
from ..config import Config
from .base import Algorithm, Batch, levels


@torch.no_grad()
def denoise_to(model, cond, noise: Tensor, grid: list[float], stops: list[int], guidance: float) -> Tensor:
    """Euler steps on ``grid`` from ``noise``; sample ``i`` stops after ``stops[i]`` steps (its
    state is then at level ``grid[stops[i]]``). No gradient."""
    x = noise
    stop = torch.tensor(stops, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
    for j in range(max(stops)):
        a, b = grid[j], grid[j + 1]
        v = model.velocity(x, levels([a] * x.shape[0], x), cond, guidance)
        x = torch.where(stop > j, M.euler_step(x, v.to(x.dtype), a, b), x)
    return x


def step_range(steps: int, fraction: tuple[float, float]) -> tuple[int, int]:
    """Inclusive range of rollout steps ``floor(f0 T) .. ceil(f1 T) - 1`` (at least one step)."""
    lo = min(math.floor(fraction[0] * steps), steps - 1)
    hi = min(max(lo, math.ceil(fraction[1] * steps) - 1), steps - 1)
    return lo, hi


class ReFL(Algorithm):
    name = "refl"
    needs_rollout = False  # it denoises only as far as the step it trains

    def __init__(self, cfg: Config, reward_fn):
        reward_fn.check_mode(cfg.refl.reward, "refl")
        self.cfg, self.reward_fn = cfg, reward_fn

    def draw_steps(self, batch: Batch) -> list[int]:
        lo, hi = step_range(self.cfg.rollout.steps, self.cfg.refl.step_fraction)
        return [int(seeding.rng(self.cfg.train.seed, batch.step, i, "timestep").integers(lo, hi + 1)) for i in batch.indices]

    def loss(self, r: Tensor) -> Tensor:
        c = self.cfg.refl
        return torch.relu(c.threshold - r) if c.loss == "relu" else -r

    def backward(self, model, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        js = self.draw_steps(batch)
        grid = model.schedule_for(batch.eps, cfg.rollout.steps).tolist()
        x = denoise_to(model, batch.cond, batch.eps.float(), grid, js, cfg.rollout.guidance)
        t = levels([grid[j] for j in js], x)
        batch.begin_pass(True)
        v = model.velocity(x, t, batch.cond, cfg.train.guidance)
        images = model.decode(M.one_step_x0(x, v, t))
        r = self.reward_fn.baseline(cfg.refl.reward, images, batch)
        loss = self.loss(r).sum() * batch.loss_scale
        loss.backward()
        return {"loss": loss.item(), "reward": r.mean().item(), "t": t.mean().item()}
