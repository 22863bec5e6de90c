"""Stochastic rollouts with per-step Gaussian log-probabilities (for the GRPO baseline).

Flow-GRPO's SDE for rectified flow (``x_s = (1 - s) x0 + s eps``, velocity ``v ~ eps - x0``) has
the same marginals as the Euler ODE for any noise schedule ``sigma_s``. One step from level ``a``
to the cleaner level ``b`` (``dt = b - a < 0``) is Gaussian::

    mean = x + [v + sigma^2 / (2 a) * (x + (1 - a) v)] * dt
    std  = sigma * sqrt(-dt),        sigma = eta * sqrt(a / (1 - a))

``x + (1 - a) v`` is the model's estimate of ``a * eps``, so the extra drift is ``-sigma^2 / 2``
times the score. At ``a = 1`` the ratio ``a / (1 - a)`` is capped with the schedule's second level,
as in Flow-GRPO. As ``eta -> 0`` the step becomes the Euler ODE step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .method import _levels


def noise_scale(a: float, eta: float, cap: float) -> float:
    """``sigma = eta * sqrt(a / (1 - min(a, cap)))``; ``cap < 1`` keeps it finite at ``a = 1``."""
    return eta * math.sqrt(a / (1.0 - min(a, cap)))


def sde_mean_std(x: Tensor, v: Tensor, a, b, eta: float, cap: float) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the Gaussian transition ``x_a -> x_b`` (per sample).

    ``a``, ``b`` are floats or ``[B]`` tensors of levels (``b < a``); ``std`` broadcasts over ``x``
    (a scalar, or ``[B, 1, ...]``). ``eta`` must be positive for the density to exist.
    """
    a_t, b_t = _levels(a, x), _levels(b, x)
    dt = b_t - a_t
    cap_t = torch.as_tensor(cap, dtype=x.dtype, device=x.device)
    sigma = eta * torch.sqrt(a_t / (1 - torch.minimum(a_t, cap_t)))
    mean = x + (v + sigma**2 / (2 * a_t) * (x + (1 - a_t) * v)) * dt
    std = sigma * torch.sqrt(-dt)
    return mean, std


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x_next; mean, std^2 I)`` summed over all but the batch dimension: ``[B]``."""
    var = std**2
    lp = -((x_next - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(1)


def sde_step(x: Tensor, v: Tensor, a, b, eta: float, cap: float, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Sample ``x_b = mean + std * noise``; returns ``(x_b, log p(x_b | x_a))``."""
    mean, std = sde_mean_std(x, v, a, b, eta, cap)
    x_next = mean + std * noise
    return x_next, gaussian_log_prob(x_next, mean, std)


def level_cap(grid: list[float]) -> float:
    """The cap of ``a / (1 - a)`` at ``a = 1``: the schedule's second level (Flow-GRPO)."""
    return grid[1] if len(grid) > 2 else 0.5


@torch.no_grad()
def sde_rollout(model, cond, noise: Tensor, grid: list[float], guidance: float = 1.0,
                eta: float = 0.3, generator: torch.Generator | None = None, deterministic_last: bool = False):
    """SDE sampling on the levels ``grid`` (1 -> 0, the model's schedule) from ``noise``, no gradient.

    Returns ``(x0, trajectory [B, steps + 1, ...], log_probs [B, steps])``; ``trajectory[:, i]``
    is at level ``grid[i]``. Step noise is drawn on the generator's device (CPU by default) so a
    seed reproduces across devices. ``deterministic_last`` takes the last step as an Euler step
    (its log-probability is then 0 and it must not be trained on).
    """
    steps = len(grid) - 1
    cap = level_cap(grid)
    x, states, log_probs = noise, [noise], []
    gen_device = generator.device if generator is not None else "cpu"
    for i, (a, b) in enumerate(zip(grid[:-1], grid[1:])):
        sigma = torch.full((x.shape[0],), a, dtype=x.dtype, device=x.device)
        v = model.velocity(x, sigma, cond, guidance)
        z = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        if deterministic_last and i == steps - 1:
            x, lp = x + (b - a) * v, torch.zeros(x.shape[0], device=x.device)
        else:
            x, lp = sde_step(x, v, a, b, eta, cap, z)
        states.append(x)
        log_probs.append(lp)
    return x, torch.stack(states, 1), torch.stack(log_probs, 1)
