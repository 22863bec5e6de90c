"""Rollouts: sampling clean latents from known noise with any FlowModel, on the model's own
schedule. The caller keeps the noise: it is the Direct-Align prior ``eps`` of the sample it
produced. The stochastic sampler GRPO needs (Flow-GRPO's SDE with per-step log-probabilities)
is :func:`srpo.sde.sde_rollout`."""

from __future__ import annotations

import torch
from torch import Tensor

from .method import euler_step
from .models.base import Cond


@torch.no_grad()
def rollout(model, cond: Cond, noise: Tensor, steps: int = 25, guidance: float = 1.0,
            return_trajectory: bool = False):
    """Euler ODE from ``noise`` (level 1) to clean latents (level 0) on
    ``model.schedule(steps, height, width)``; no gradient, float32. With ``return_trajectory``
    also returns the states ``[B, steps + 1, ...]`` (index ``i`` at the schedule's level ``i``)."""
    grid = model.schedule_for(noise, steps).tolist()
    x = noise.float()
    states = [x]
    for a, b in zip(grid[:-1], grid[1:]):
        sigma = torch.full((x.shape[0],), a, dtype=torch.float32, device=x.device)
        x = euler_step(x, model.velocity(x, sigma, cond, guidance), a, b)
        if return_trajectory:
            states.append(x)
    if return_trajectory:
        return x, torch.stack(states, dim=1)
    return x
