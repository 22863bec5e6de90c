"""The math of SRPO as pure tensor functions.

Rectified-flow notation (see shared SRPO.md): ``x_s = (1 - s) * x0 + s * eps`` with ``s`` the
noise level (1 = pure noise); the model predicts a velocity ``v ~ eps - x0``; an Euler step from
level ``a`` to ``b`` is ``x_b = x_a + (b - a) * v``.

This module imports only torch. Everything here is differentiable where it makes sense and
works on any latent shape: per-sample levels broadcast over the trailing dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def time_shift(t: Tensor | float, shift: float = 3.0) -> Tensor:
    """FLUX / SD3 time shift ``m t / (1 + (m - 1) t)``; identity for ``m = 1``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def inference_grid(steps: int = 50, shift: float = 3.0) -> Tensor:
    """Noise levels of an ``steps``-step Euler schedule: ``shift(linspace(1, 0, steps + 1))``.

    ``grid[0] = 1`` (pure noise) and ``grid[steps] = 0`` (clean). float64.
    """
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift exponent (diffusers' ``calculate_shift``): ``mu`` linear in the
    image token count between ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``;
    the schedule is then :func:`time_shift` with ``m = exp(mu)``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def training_grid(schedule: Tensor, index_range: tuple[int, int] = (5, 25), cells: int = 1000) -> Tensor:
    """The fine grid ``L = linspace(g[i0], g[i1], cells)`` over a range of indices of an
    inference schedule ``g`` (levels from 1 to 0, e.g. a model's 50-step sigmas).

    The range is given in schedule indices so that it means the same for every model family
    whatever its step count and shift rule. ``L[0]`` is the noisiest level.
    """
    i0, i1 = index_range
    steps = len(schedule) - 1
    if not 0 <= i0 < i1 <= steps:
        raise ValueError(f"index range {index_range} must satisfy 0 <= start < end <= {steps}")
    return torch.linspace(float(schedule[i0]), float(schedule[i1]), cells, dtype=torch.float64)


def _levels(s: Tensor | float, like: Tensor) -> Tensor:
    """Per-sample levels (shape [B] or scalar) broadcast against ``like`` ([B, ...])."""
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    if s.dim() == 1:
        s = s.reshape(-1, *([1] * (like.dim() - 1)))
    return s


def add_noise(x0: Tensor, eps: Tensor, s: Tensor | float) -> Tensor:
    """``x_s = (1 - s) x0 + s eps``."""
    s = _levels(s, x0)
    return (1 - s) * x0 + s * eps


def euler_step(x: Tensor, v: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    """One Euler step of the flow ODE from level ``a`` to level ``b`` (either direction)."""
    return x + (_levels(b, x) - _levels(a, x)) * v


def recover_x0(x_b: Tensor, eps: Tensor, b: Tensor | float) -> Tensor:
    """Direct-Align recovery with the known noise: ``x0_hat = (x_b - b eps) / (1 - b)``."""
    b = _levels(b, x_b)
    return (x_b - b * eps) / (1 - b)


def one_step_x0(x_a: Tensor, v: Tensor, a: Tensor | float) -> Tensor:
    """The plain one-step prediction ``x_a - a v`` (ReFL style; blurry at high noise)."""
    return x_a - _levels(a, x_a) * v


def direct_align_x0(x0: Tensor, eps: Tensor, v_fn, a: Tensor | float, b: Tensor | float) -> Tensor:
    """Direct-Align in one call: noise ``x0`` to ``a`` (detached), one step to ``b`` with the
    velocity ``v_fn(x_a)``, recover with ``eps``. Gradient flows only through ``v_fn``."""
    x_a = add_noise(x0, eps, a).detach()
    x_b = euler_step(x_a, v_fn(x_a), a, b)
    return recover_x0(x_b, eps, b)


@dataclass(frozen=True)
class BranchLevels:
    """Levels and weight indices of one SRPO update (denoise + inversion branch)."""

    ts: int  # fine-grid step index drawn for the denoise branch
    k: int  # step size in fine-grid cells
    ts2: int  # fine-grid step index of the inversion branch
    denoise: tuple[float, float]  # (a, b): a noisier than b
    inversion: tuple[float, float]  # (a, b): a cleaner than b


def step_size(ts: int, cells: int, max_cells: int = 100) -> int:
    """``k = min(T - ts, K, ts)``."""
    return min(cells - ts, max_cells, ts)


def branch_levels(grid: Tensor, ts: int, max_cells: int = 100) -> BranchLevels:
    """Denoise and inversion levels on the fine grid ``L`` (``T = len(L)``) for step index ``ts``.

    - denoise: ``a = L[T - ts - k]`` (noisier) -> ``b = L[T - ts]``;
    - inversion: ``ts2 = max(ts - k, 1)``, ``a = L[T - ts2]`` (cleaner) ->
      ``b = L[T - min(ts2 + k, T)]`` (the denoise branch's landing level when ``ts2 = ts - k``).
    """
    cells = len(grid)
    if not 1 <= ts < cells:
        raise ValueError(f"ts={ts} must lie in [1, {cells - 1}]")
    k = step_size(ts, cells, max_cells)
    # index T is one past the end: clamp to the last cell (only reachable at ts = 0, excluded)
    at = lambda i: float(grid[min(i, cells - 1)])  # noqa: E731
    ts2 = max(ts - k, 1)
    return BranchLevels(
        ts=ts,
        k=k,
        ts2=ts2,
        denoise=(at(cells - ts - k), at(cells - ts)),
        inversion=(at(cells - ts2), at(cells - min(ts2 + k, cells))),
    )


def dx0_dv(a: float, b: float) -> float:
    """Derivative of the recovered ``x0_hat`` with respect to the velocity: ``(b - a) / (1 - b)``.

    Negative in the denoise branch (b < a), positive in the inversion branch (b > a).
    """
    return (b - a) / (1 - b)


def srp_text_direction(f_pos: Tensor, f_neg: Tensor, k: Tensor | float = 0.0) -> Tensor:
    """The training form of the semantic-relative reward, ``(1 + k) RM(x, pos) - RM(x, neg)``, as
    one text direction for dot-product rewards: ``f_img . ((1 + k) f_pos - f_neg)``. At ``k = 0``
    it is the paper form ``RM(pos) - RM(neg)``, where any image-only term cancels exactly; at
    ``k > 0`` it leaves ``k`` times the image's score against ``pos``."""
    if isinstance(k, Tensor) and k.dim() == 1:
        k = k[:, None]
    return (1 + k) * f_pos - f_neg


def linear_weights(start: float, end: float, cells: int = 1000) -> Tensor:
    """Per-branch linear weight schedule over the fine grid, e.g. ``k_pos = linear(0.10, 0.25)``
    (indexed by ``ts``; larger at higher noise) and ``k_inv = linear(0.30, 0.01)`` (indexed by
    ``ts2``; larger at lower noise)."""
    return torch.linspace(start, end, cells, dtype=torch.float64)


def noise_discount(cells: int = 100, shift: float = 3.0) -> Tensor:
    """Multiplicative discount of the single-branch (Qwen-Image) variant:
    ``shift(linspace(0, 1, cells + 1))``, read at the pass's fine-grid step index ``ts`` (larger
    ``ts`` = a noisier landing level ``L[T - ts]``), so it grows with noise."""
    return time_shift(torch.linspace(0.0, 1.0, cells + 1, dtype=torch.float64), shift)


def hinge_loss(reward: Tensor, threshold: float = 0.7) -> Tensor:
    """``relu(threshold - r)``: zero once the reward passes the threshold."""
    return torch.relu(threshold - reward)
