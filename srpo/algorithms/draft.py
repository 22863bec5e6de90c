"""DRaFT-K (Clark et al. 2023): sample without gradient down to the last K steps of the rollout
schedule, run those K Euler steps with gradient, score the final image, loss ``-r``.

Each step is wrapped in ``torch.utils.checkpoint`` (``draft.checkpoint``): only the K step
inputs are kept and each step's activations are recomputed in the backward pass, so activation
memory is about one model forward whatever K, at the cost of a second forward per step.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .. import memory
from .. import method as M
from ..config import Config
from .base import Algorithm, Batch
from .refl import baseline_reward, check_reward_mode, denoise_to, levels


def unrolled_steps(model, x, cond, grid: list[float], start: int, guidance: float, cfg: Config,
                   use_checkpoint: bool):
    """Euler steps ``start .. len(grid) - 2`` of ``grid`` from ``x``, with gradient."""

    def step(x_in, a, b):
        with memory.autocast(cfg, x_in.device):
            v = model.velocity(x_in, levels([a] * x_in.shape[0], x_in), cond, guidance)
        return M.euler_step(x_in, v.float(), a, b)

    for j in range(start, len(grid) - 1):
        a, b = grid[j], grid[j + 1]
        x = checkpoint(step, x, a, b, use_reentrant=False) if use_checkpoint else step(x, a, b)
    return x


class DRaFT(Algorithm):
    name = "draft"
    needs_rollout = False  # the no-grad part of the chain is its own rollout

    def __init__(self, cfg: Config, reward_fn):
        check_reward_mode(reward_fn, cfg.draft.reward, "draft")
        self.cfg, self.reward_fn = cfg, reward_fn
        self.grid = M.inference_grid(cfg.rollout.steps, cfg.method.shift).tolist()
        self.k = min(cfg.draft.k, cfg.rollout.steps)

    def backward(self, model, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        start = cfg.rollout.steps - self.k
        x = batch.eps
        if start > 0:
            with memory.autocast(cfg, x.device):
                x = denoise_to(model, batch.cond, x, self.grid, [start] * x.shape[0], cfg.rollout.guidance)
        x0 = unrolled_steps(model, x.detach(), batch.cond, self.grid, start, cfg.train.guidance, cfg,
                            cfg.draft.checkpoint)
        r = baseline_reward(self.reward_fn, cfg.draft.reward, model.decode(x0), batch)
        loss = -r.sum() * batch.loss_scale
        loss.backward()
        return {"loss": loss.item(), "reward": r.mean().item(), "k": float(self.k)}
