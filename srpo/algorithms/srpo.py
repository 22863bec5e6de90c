"""SRPO: Direct-Align over the early-timestep range with the semantic-relative reward.

``method.variant``:

- ``two_branch`` (the reference FLUX trainer): two accumulated micro-steps on the same rollout
  sample, the denoise branch and the inversion branch (control words swapped), each
  ``relu(0.7 - r) / 2`` with ``r = (1 + k) RM(pos) - RM(neg)``, ``k_pos[ts]`` / ``k_inv[ts2]``;
- ``discounted`` (the reference Qwen-Image trainer): ``method.passes`` denoise-only micro-steps,
  each with its own ``ts``, ``r = (RM(pos) - RM(neg)) * d[ts]`` with the noise discount
  ``d = shift(linspace(0, 1, T + 1))`` read at the pass's fine-grid index, loss ``-r / passes``.
"""

from __future__ import annotations

import torch

from .. import method as M
from .. import seeding
from ..config import Config
from .base import Algorithm, Batch, RewardFn, levels


class SRPO(Algorithm):
    name = "srpo"

    def __init__(self, cfg: Config, reward_fn: RewardFn):
        m, s = cfg.method, cfg.srp
        self.cfg, self.reward_fn = cfg, reward_fn
        self.k_pos = M.linear_weights(*s.k_pos, m.cells)
        self.k_inv = M.linear_weights(*s.k_inv, m.cells)
        self.discount = M.noise_discount(m.cells, m.discount_shift) if m.variant == "discounted" else None
        self.branches = [name for name, on in (("denoise", m.denoise_branch), ("inversion", m.inversion_branch)) if on]
        self._grids: dict = {}

    def grid(self, model, x0) -> torch.Tensor:
        """The fine grid over ``method.index_range`` of the model's own inference schedule."""
        m = self.cfg.method
        key = tuple(x0.shape[-2:])
        if key not in self._grids:
            self._grids[key] = M.training_grid(model.schedule_for(x0, m.schedule_steps), tuple(m.index_range), m.cells)
        return self._grids[key]

    def draw_ts(self, batch: Batch, member: int = 0) -> list[int]:
        m = self.cfg.method
        return [int(seeding.rng(self.cfg.train.seed, batch.step, i, "timestep", member)
                    .integers(m.ts_margin, m.cells - m.ts_margin + 1)) for i in batch.indices]

    def loss(self, r):
        if self.cfg.method.loss == "hinge" and self.discount is None:
            return M.hinge_loss(r, self.cfg.method.hinge_threshold)
        return -r

    def branch(self, model, batch: Batch, lv, ks, swap: bool, passes: int, last: bool,
               weights=None) -> dict[str, float]:
        """One Direct-Align micro-step with gradient (``last``: the micro-batch's last); backward
        inside, returns metrics."""
        batch.begin_pass(last)
        x0, eps = batch.x0.float(), batch.eps.float()
        a, b = levels([v[0] for v in lv], x0), levels([v[1] for v in lv], x0)
        x0_hat = M.direct_align_x0(x0, eps, lambda x_a: model.velocity(x_a, a, batch.cond, self.cfg.train.guidance), a, b)
        images = model.decode(x0_hat)
        k = torch.tensor(ks, device=x0.device, dtype=torch.float32)
        r, parts = self.reward_fn(images, batch.prompts, batch.pos_word, batch.neg_word, k, swap)
        if weights is not None:
            r = r * torch.tensor(weights, device=r.device, dtype=r.dtype)
        loss = self.loss(r).sum() * batch.loss_scale / passes
        loss.backward()
        return {"loss": loss.item(), "reward": r.mean().item(), **parts}

    def backward(self, model, batch: Batch) -> dict[str, float]:
        if self.discount is not None:
            return self.discounted(model, batch)
        grid = self.grid(model, batch.x0)
        all_levels = [M.branch_levels(grid, ts, self.cfg.method.max_step_cells) for ts in self.draw_ts(batch)]
        out: dict[str, float] = {"loss": 0.0, "ts": sum(lv.ts for lv in all_levels) / len(all_levels)}
        rewards = []
        for i, name in enumerate(self.branches):
            last = i == len(self.branches) - 1
            if name == "denoise":
                lv = [x.denoise for x in all_levels]
                ks = [float(self.k_pos[x.ts]) for x in all_levels]
                m = self.branch(model, batch, lv, ks, False, len(self.branches), last)
            else:
                lv = [x.inversion for x in all_levels]
                ks = [float(self.k_inv[x.ts2]) for x in all_levels]
                m = self.branch(model, batch, lv, ks, True, len(self.branches), last)
            out["loss"] += m.pop("loss")
            rewards.append(m["reward"])
            out.update({f"{name}/{key}": val for key, val in m.items()})
        out["reward"] = sum(rewards) / len(rewards)
        return out

    def discounted(self, model, batch: Batch) -> dict[str, float]:
        """The single-branch variant: ``method.passes`` denoise passes, each its own ts; the step
        size of a pass is capped by the previous pass's (the reference's k carries over)."""
        m = self.cfg.method
        grid = self.grid(model, batch.x0)
        caps = [m.max_step_cells] * len(batch.indices)
        out: dict[str, float] = {"loss": 0.0}
        rewards, tss = [], []
        for p in range(m.passes):
            lvs = [M.branch_levels(grid, ts, cap) for ts, cap in zip(self.draw_ts(batch, p), caps)]
            caps = [lv.k for lv in lvs]
            weights = [float(self.discount[lv.ts]) for lv in lvs]
            r = self.branch(model, batch, [lv.denoise for lv in lvs], [0.0] * len(lvs), False, m.passes,
                            p == m.passes - 1, weights)
            out["loss"] += r.pop("loss")
            rewards.append(r["reward"])
            tss += [lv.ts for lv in lvs]
            out.update({f"pass{p}/{key}": val for key, val in r.items()})
        out["reward"] = sum(rewards) / len(rewards)
        out["ts"] = sum(tss) / len(tss)
        return out
