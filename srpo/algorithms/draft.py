"""DRaFT-K (Clark et al. 2023): sample without gradient down to the last K steps of the rollout
schedule, run those K Euler steps with gradient, score the final image, loss ``-r``.

Each step is wrapped in ``torch.utils.checkpoint`` (``draft.checkpoint``): only the K step
inputs are kept and each step's activations are recomputed in the backward pass, so activation
memory is about one model forward whatever K, at the cost of a second forward per step.
"""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint

from .. import method as M
from ..config import Config
from .base import Algorithm, Batch, levels
from .refl import denoise_to


def unrolled_steps(model, x, cond, grid: list[float], start: int, guidance: float, use_checkpoint: bool):
    """Euler steps ``start .. len(grid) - 2`` of ``grid`` from ``x``, with gradient."""

    def step(x_in, a, b):
        return M.euler_step(x_in, model.velocity(x_in, levels([a] * x_in.shape[0], x_in), cond, guidance), a, b)

    for j in range(start, len(grid) - 1):
        a, b = grid[j], grid[j + 1]
        x = checkpoint(step, x, a, b, use_reentrant=False) if use_checkpoint else step(x, a, b)
    return x


class DRaFT(Algorithm):
    name = "draft"
    needs_rollout = False  # the no-grad part of the chain is its own rollout

    def __init__(self, cfg: Config, reward_fn):
        reward_fn.check_mode(cfg.draft.reward, "draft")
        self.cfg, self.reward_fn = cfg, reward_fn
        self.k = min(cfg.draft.k, cfg.rollout.steps)

    def backward(self, model, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        start = cfg.rollout.steps - self.k
        x = batch.eps.float()
        grid = model.schedule_for(x, cfg.rollout.steps).tolist()
        if start > 0:
            x = denoise_to(model, batch.cond, x, grid, [start] * x.shape[0], cfg.rollout.guidance)
        batch.begin_pass(True)
        x0 = unrolled_steps(model, x.detach(), batch.cond, grid, start, cfg.train.guidance, cfg.draft.checkpoint)
        r = self.reward_fn.baseline(cfg.draft.reward, model.decode(x0), batch)
        loss = -r.sum() * batch.loss_scale
        loss.backward()
        return {"loss": loss.item(), "reward": r.mean().item(), "k": float(self.k)}
