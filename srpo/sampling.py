"""Rollouts: sampling clean latents from known noise with any FlowModel.

The caller keeps the noise: it is the Direct-Align prior ``eps`` of the sample it produced.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .method import euler_step, inference_grid
from .models.base import Cond, FlowModel


def initial_noise(model: FlowModel, batch: int, height: int, width: int,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal latents of ``model.latent_shape(batch, height, width)`` on the model's
    device (drawn on the generator's device, CPU by default, so seeds reproduce across devices)."""
    shape = model.latent_shape(batch, height, width)
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(model.device)


@torch.no_grad()
def rollout(model: FlowModel, cond: Cond, noise: Tensor, steps: int = 25, shift: float = 3.0,
            guidance: float = 1.0, return_trajectory: bool = False):
    """Euler ODE from ``noise`` (level 1) to clean latents (level 0) on ``inference_grid(steps,
    shift)``; no gradient. With ``return_trajectory`` also returns the states ``[B, steps + 1, ...]``
    (index ``i`` at level ``grid[i]``; the last is the returned ``x0``)."""
    grid = inference_grid(steps, shift).tolist()
    x = noise
    states = [x]
    for a, b in zip(grid[:-1], grid[1:]):
        sigma = torch.full((x.shape[0],), a, dtype=x.dtype, device=x.device)
        x = euler_step(x, model.velocity(x, sigma, cond, guidance), a, b)
        if return_trajectory:
            states.append(x)
    if return_trajectory:
        return x, torch.stack(states, dim=1)
    return x


@torch.no_grad()
def sample_images(model: FlowModel, prompts: list[str], noise: Tensor, steps: int = 25,
                  guidance: float = 3.5, shift: float = 3.0) -> Tensor:
    """Prompts + noise -> pixels in [0, 1], ``[B, 3, H, W]`` (one prompt per noise sample)."""
    x0 = rollout(model, model.encode_prompts(prompts), noise, steps=steps, shift=shift, guidance=guidance)
    return model.decode(x0)


# ---- SDE sampler (for the GRPO baseline) -----------------------------------------------------
# The stochastic rollout GRPO needs (Flow-GRPO's SDE on the same `inference_grid`, per-step
# Gaussian log-probabilities, the Euler step as eta -> 0) lives in srpo/sde.py:
#     sde_rollout(model, cond, noise, steps, shift, guidance, eta, generator)
#         -> x0, trajectory [B, steps + 1, ...], log_probs [B, steps]
#     step_log_prob(model, x_a, x_b, a, b, cond, guidance, eta, cap) -> [B]   (with gradient)
