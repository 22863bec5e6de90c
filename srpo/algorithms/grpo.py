"""GRPO for flow models, DanceGRPO / Flow-GRPO style.

Per prompt: a group of G stochastic rollouts (Flow-GRPO's SDE, :mod:`srpo.sde`) without
gradient, recording every state and per-step log-probability; rewards of the decoded images are
normalised within the group (advantages, clipped); then, for a random subset of the sampling
steps, the log-probability of each stored transition is recomputed with gradient and the PPO
clipped-ratio loss is back-propagated, one step (and chunk of the group) at a time.

The trainer steps the optimizer once per update, so the recomputed policy equals the sampling
policy: the ratio is 1 up to rounding and the loss gradient is the group-baseline policy
gradient ``-A grad log p``; the clip only acts when the two differ (as in the references, whose
optimizer steps between timesteps of the same rollouts).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import sde, seeding
from ..config import Config
from ..models.base import select_cond
from .base import Algorithm, Batch, levels


def group_advantages(rewards: Tensor, clip: float, eps: float = 1e-8) -> Tensor:
    """``(r - mean) / (std + eps)`` over one group ``[G]`` (population std), clipped to ``+-clip``."""
    adv = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)
    return adv.clamp(-clip, clip)


def ppo_loss(log_ratio: Tensor, adv: Tensor, clip: float) -> Tensor:
    """Per-sample clipped surrogate ``max(-A r, -A clip(r, 1 - c, 1 + c))`` with ``r = exp(log_ratio)``."""
    ratio = torch.exp(log_ratio)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))


def repeat_cond(cond, n: int):
    """A batch-1 conditioning repeated ``n`` times (a view, no copy)."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


class GRPO(Algorithm):
    name = "grpo"
    needs_rollout = False  # it samples its own groups with the SDE

    def __init__(self, cfg: Config, reward_fn):
        reward_fn.check_mode(cfg.grpo.reward, "grpo")
        self.cfg, self.reward_fn = cfg, reward_fn
        self.steps = cfg.grpo.steps or cfg.rollout.steps
        self.ref = None  # frozen base transformer, built on first use when kl_beta > 0

    # ---- sampling ------------------------------------------------------------------------
    def group_noise(self, batch: Batch, i: int) -> Tensor:
        g, c = self.cfg.grpo, self.cfg.train
        if g.same_group_noise:
            return batch.eps[i:i + 1].expand(g.group_size, *batch.eps.shape[1:]).contiguous()
        shape = batch.eps[i:i + 1].shape
        return torch.cat([seeding.noise(shape, c.seed, batch.step, [batch.indices[i]], "grpo_group", member=m)
                          for m in range(g.group_size)]).to(batch.eps)

    def train_steps(self, batch: Batch, index: int) -> list[int]:
        """A random subset of ``int(T * timestep_fraction)`` sampling steps (at least one)."""
        g = self.cfg.grpo
        candidates = self.steps - 1 if g.ignore_last else self.steps
        n = min(max(1, int(self.steps * g.timestep_fraction)), candidates)
        order = seeding.rng(self.cfg.train.seed, batch.step, index, "timestep").permutation(candidates)
        return sorted(int(j) for j in order[:n])

    def sample_group(self, model, batch: Batch, i: int, grid: list[float]):
        cfg = self.cfg
        cond = repeat_cond(select_cond(batch.cond, slice(i, i + 1)), cfg.grpo.group_size)
        gen = seeding.generator(cfg.train.seed, batch.step, batch.indices[i], "sde")
        x0, traj, log_probs = sde.sde_rollout(model, cond, self.group_noise(batch, i).float(), grid,
                                              cfg.rollout.guidance, cfg.grpo.eta, gen)
        with torch.no_grad():
            r = self.reward_fn.baseline(cfg.grpo.reward, model.decode(x0), batch,
                                        prompts=[batch.prompts[i]] * cfg.grpo.group_size)
        return cond, traj, log_probs, r.float()

    # ---- KL reference --------------------------------------------------------------------
    def reference_mean(self, model, x_a, a, b, cond, cap: float) -> Tensor:
        """Transition mean under the frozen base transformer (the config's model, rebuilt once)."""
        if self.ref is None:
            from ..models import load_model

            base = load_model(self.cfg.model, model.device)
            self.ref = base.transformer.requires_grad_(False).eval()
        trained, model.transformer = model.transformer, self.ref  # borrow the adapter's plumbing
        try:
            with torch.no_grad():
                v = model.velocity(x_a, levels([a] * x_a.shape[0], x_a), cond, self.cfg.rollout.guidance)
        finally:
            model.transformer = trained
        return sde.sde_mean_std(x_a, v, a, b, self.cfg.grpo.eta, cap)[0]

    # ---- the update ----------------------------------------------------------------------
    def backward(self, model, batch: Batch) -> dict[str, float]:
        cfg, g = self.cfg, self.cfg.grpo
        sums = {"loss": 0.0, "reward": 0.0, "reward_std": 0.0, "ratio": 0.0, "clip_frac": 0.0, "kl": 0.0}
        count = 0
        grid = model.schedule_for(batch.eps, self.steps).tolist()
        cap = sde.level_cap(grid)
        for i, index in enumerate(batch.indices):
            cond, traj, old_lp, r = self.sample_group(model, batch, i, grid)
            adv = group_advantages(r, g.adv_clip)
            steps = self.train_steps(batch, index)
            per_elem = 1.0 / math.prod(traj.shape[2:]) if g.log_prob == "mean" else 1.0
            chunk = g.chunk or g.group_size
            starts = range(0, g.group_size, chunk)
            for j in steps:
                a, b = grid[j], grid[j + 1]
                for s in starts:
                    sl = slice(s, s + chunk)
                    x_a, x_b = traj[sl, j], traj[sl, j + 1]
                    c = {k: v[sl] for k, v in cond.items()}
                    batch.begin_pass(i == len(batch.indices) - 1 and j == steps[-1] and s == starts[-1])
                    v = model.velocity(x_a, levels([a] * x_a.shape[0], x_a), c, cfg.rollout.guidance)
                    mean, std = sde.sde_mean_std(x_a, v, a, b, g.eta, cap)
                    new_lp = sde.gaussian_log_prob(x_b, mean, std)
                    log_ratio = (new_lp - old_lp[sl, j]) * per_elem
                    loss = ppo_loss(log_ratio, adv[sl], g.clip_range)
                    kl = torch.zeros_like(loss)
                    if g.kl_beta > 0:
                        ref_mean = self.reference_mean(model, x_a, a, b, c, cap)
                        kl = ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).sum(1) * per_elem
                        loss = loss + g.kl_beta * kl
                    total = loss.sum() / (g.group_size * len(steps)) * batch.loss_scale
                    total.backward()
                    sums["loss"] += total.item()
                    ratio = log_ratio.detach().exp()
                    sums["ratio"] += ratio.sum().item()
                    sums["clip_frac"] += ((ratio - 1).abs() > g.clip_range).float().sum().item()
                    sums["kl"] += kl.detach().sum().item()
                    count += x_a.shape[0]
            sums["reward"] += r.mean().item() / len(batch.indices)
            sums["reward_std"] += r.std(unbiased=False).item() / len(batch.indices)
        for key in ("ratio", "clip_frac", "kl"):
            sums[key] /= max(count, 1)
        return sums
