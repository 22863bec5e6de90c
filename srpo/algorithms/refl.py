"""ReFL (ImageReward, Xu et al. 2023): denoise without gradient to a random late step of the
sampling chain, take one model step with gradient, score the one-step prediction ``x_t - t v``.

Also the helpers the other chain baselines share: a partial no-grad Euler rollout and the
baseline reward (absolute or semantic-relative); autocast comes from :func:`srpo.memory.autocast`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import memory
from .. import method as M
from ..config import Config
from ..errors import UserError
from .base import Algorithm, Batch, sample_rng


def levels(values, like: Tensor) -> Tensor:
    """Per-sample levels as a ``[B]`` tensor on ``like``'s device and dtype."""
    return torch.tensor([float(v) for v in values], device=like.device, dtype=like.dtype)


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


def check_reward_mode(reward_fn, mode: str, section: str) -> None:
    """A relative baseline reward needs the SRP helper the trainer builds when srp.enabled."""
    if mode == "relative" and reward_fn.srp is None:
        raise UserError(f"{section}.reward is 'relative' but srp.enabled is false: set srp.enabled true "
                        f"(with a text-conditioned reward) or {section}.reward to absolute")


def baseline_reward(reward_fn, mode: str, images: Tensor, batch: Batch, prompts=None) -> Tensor:
    """Per-image reward ``[B]``: the absolute score, or the SRP paper form ``RM(pos) - RM(neg)``."""
    prompts = batch.prompts if prompts is None else prompts
    if mode == "absolute":
        return reward_fn.reward.score(images, prompts)
    r, _ = reward_fn(images, prompts, batch.pos_word, batch.neg_word, 0.0, False)
    return r


def step_range(steps: int, fraction: tuple[float, float]) -> tuple[int, int]:
    """Inclusive range of rollout steps ``floor(f0 T) .. ceil(f1 T) - 1`` (at least one step)."""
    lo = min(math.floor(fraction[0] * steps), steps - 1)
    hi = min(max(lo, math.ceil(fraction[1] * steps) - 1), steps - 1)
    return lo, hi


class ReFL(Algorithm):
    name = "refl"
    needs_rollout = False  # it denoises only as far as the step it trains

    def __init__(self, cfg: Config, reward_fn):
        check_reward_mode(reward_fn, cfg.refl.reward, "refl")
        self.cfg, self.reward_fn = cfg, reward_fn
        self.grid = M.inference_grid(cfg.rollout.steps, cfg.method.shift).tolist()

    def draw_steps(self, batch: Batch) -> list[int]:
        lo, hi = step_range(self.cfg.rollout.steps, self.cfg.refl.step_fraction)
        return [int(sample_rng(self.cfg.train.seed, batch.step, i, 1).integers(lo, hi + 1)) for i in batch.indices]

    def loss(self, r: Tensor) -> Tensor:
        c = self.cfg.refl
        return torch.relu(c.threshold - r) if c.loss == "relu" else -r

    def backward(self, model, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        js = self.draw_steps(batch)
        with memory.autocast(cfg, batch.eps.device):
            x = denoise_to(model, batch.cond, batch.eps, self.grid, js, cfg.rollout.guidance)
        t = levels([self.grid[j] for j in js], x)
        with memory.autocast(cfg, x.device):
            v = model.velocity(x, t, batch.cond, cfg.train.guidance)
        images = model.decode(M.one_step_x0(x, v.float(), t))
        r = baseline_reward(self.reward_fn, cfg.refl.reward, images, batch)
        loss = self.loss(r).sum() * batch.loss_scale
        loss.backward()
        return {"loss": loss.item(), "reward": r.mean().item(), "t": t.mean().item()}
