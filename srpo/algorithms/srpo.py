"""SRPO: Direct-Align over the early-timestep range with the semantic-relative reward, as two
accumulated micro-steps (denoise and inversion branch) on the same rollout sample."""

from __future__ import annotations

import torch

from .. import memory
from .. import method as M
from ..config import Config
from .base import Algorithm, Batch, sample_rng


class RewardFn:
    """Reward of decoded images: semantic-relative when an SRP helper is given, else absolute.

    ``swap`` exchanges the roles of the positive and negative words (inversion branch); without
    SRP the absolute reward is negated instead, the same sign flip."""

    def __init__(self, reward, srp=None):
        self.reward, self.srp = reward, srp

    def __call__(self, images, prompts, pos, neg, k, swap: bool):
        if self.srp is None:
            r = self.reward.score(images, prompts)
            return (-r if swap else r), {}
        if swap:
            pos, neg = neg, pos
        out = self.srp.relative(images, prompts, pos, neg, k)
        parts = {"pos": out.pos.mean().item(), "neg": out.neg.mean().item()}
        parts.update({f"term/{name}": v.mean().item() for name, v in out.terms.items()})
        return out.relative, parts


class SRPO(Algorithm):
    name = "srpo"

    def __init__(self, cfg: Config, reward_fn: RewardFn):
        m, s = cfg.method, cfg.srp
        self.cfg, self.reward_fn = cfg, reward_fn
        self.grid = M.training_grid(tuple(m.index_range), m.schedule_steps, m.shift, m.cells)
        self.k_pos = M.linear_weights(*s.k_pos, m.cells)
        self.k_inv = M.linear_weights(*s.k_inv, m.cells)
        self.discount = M.noise_discount(100, m.shift) if s.weighting == "multiplicative" else None
        self.branches = [name for name, on in (("denoise", m.denoise_branch), ("inversion", m.inversion_branch)) if on]

    def draw_ts(self, batch: Batch) -> list[int]:
        m = self.cfg.method
        return [int(sample_rng(self.cfg.train.seed, batch.step, i, 1).integers(m.ts_margin, m.cells - m.ts_margin + 1))
                for i in batch.indices]

    def loss(self, r):
        if self.cfg.method.loss == "hinge":
            return M.hinge_loss(r, self.cfg.method.hinge_threshold)
        return -r

    def branch(self, model, batch: Batch, levels, ks, swap: bool) -> dict[str, float]:
        """One Direct-Align micro-step with gradient; backward inside, returns metrics."""
        x0, eps = batch.x0, batch.eps
        a = torch.tensor([lv[0] for lv in levels], device=x0.device, dtype=x0.dtype)
        b = torch.tensor([lv[1] for lv in levels], device=x0.device, dtype=x0.dtype)
        x_a = M.add_noise(x0, eps, a).detach()
        with memory.autocast(self.cfg, x0.device):
            v = model.velocity(x_a, a, batch.cond, self.cfg.train.guidance)
        x0_hat = M.recover_x0(M.euler_step(x_a, v.float(), a, b), eps, b)
        images = model.decode(x0_hat)
        k = torch.tensor(ks, device=x0.device, dtype=torch.float32)
        r, parts = self.reward_fn(images, batch.prompts, batch.pos_word, batch.neg_word, k, swap)
        if self.discount is not None:
            w = torch.tensor([M.discount_at(lv[1], self.discount) for lv in levels], device=r.device)
            r = r * w
        loss = self.loss(r).sum() * batch.loss_scale / len(self.branches)
        loss.backward()
        return {"loss": loss.item(), "reward": r.mean().item(), **parts}

    def backward(self, model, batch: Batch) -> dict[str, float]:
        all_levels = [M.branch_levels(self.grid, ts, self.cfg.method.max_step_cells) for ts in self.draw_ts(batch)]
        out: dict[str, float] = {"loss": 0.0, "ts": sum(lv.ts for lv in all_levels) / len(all_levels)}
        rewards = []
        for name in self.branches:
            if name == "denoise":
                levels = [lv.denoise for lv in all_levels]
                ks = [float(self.k_pos[lv.ts]) for lv in all_levels]
                m = self.branch(model, batch, levels, ks, swap=False)
            else:
                levels = [lv.inversion for lv in all_levels]
                ks = [float(self.k_inv[lv.ts2]) for lv in all_levels]
                m = self.branch(model, batch, levels, ks, swap=True)
            out["loss"] += m.pop("loss")
            rewards.append(m["reward"])
            out.update({f"{name}/{key}": val for key, val in m.items()})
        out["reward"] = sum(rewards) / len(rewards)
        return out
