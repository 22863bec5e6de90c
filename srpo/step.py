"""One training update, the single definition the trainer, ``srpo bench`` and
``benchmarks/gpu_update.py`` all run: micro-batches (prompts -> noise -> rollout) -> the
algorithm's backward (gradients reduced over ranks once, in the update's last backward:
:class:`srpo.parallel.GradSync`) -> gradient clipping -> finite check -> optimizer step. Building and
preparing a run before its first update is :mod:`srpo.setup`'s.

:class:`Batches` turns (update, micro-step) into a :class:`~srpo.algorithms.base.Batch` from the
run's prompts (or offline images); every per-sample choice in it is a function of (seed,
update, global sample index) so any layout over ranks trains the same model.
"""

from __future__ import annotations

import math
import time

import torch

from . import parallel, seeding
from .algorithms.base import Batch
from .sampling import rollout


def control_words(cfg, step: int) -> tuple[str, str]:
    """The update's (positive, negative) control words. ``cycle`` starts at the second pair, as
    the reference trainer does (its update counter starts at 1)."""
    pos, neg = cfg.srp.pos_words, cfg.srp.neg_words
    if cfg.srp.word_order == "cycle":
        return pos[(step + 1) % len(pos)], neg[(step + 1) % len(neg)]
    rng = seeding.rng(cfg.train.seed, step, 0, "words")
    return pos[int(rng.integers(len(pos)))], neg[int(rng.integers(len(neg)))]


def rollout_noise(model, cfg, step: int, indices: list[int]) -> torch.Tensor:
    """Shared noise depends on (seed, update); per-sample noise on (seed, update, index)."""
    keys = [0] * len(indices) if cfg.train.shared_noise else indices
    return seeding.noise(model.latent_shape(1, cfg.rollout.height, cfg.rollout.width), cfg.train.seed, step,
                         keys, "rollout_noise", device=model.device)


class Batches:
    """The micro-batches of a run: ``batches(step, micro)`` -> Batch (rollout included)."""

    def __init__(self, cfg, model, algorithm, prompts: list[str], ctx, offline=None):
        t = cfg.train
        self.cfg, self.model, self.algorithm, self.prompts, self.offline = cfg, model, algorithm, prompts, offline
        self.per_rank = t.batch_size * t.grad_accum
        self.rank = ctx.rank
        self.global_batch = self.per_rank * ctx.world
        self.order = seeding.prompt_order(t.seed, len(prompts)) if prompts else None

    def offline_at(self, step: int) -> bool:
        return self.offline is not None and self.offline.active(step)

    def indices(self, micro: int) -> list[int]:
        b = self.cfg.train.batch_size
        return [self.rank * self.per_rank + micro * b + j for j in range(b)]

    @torch.no_grad()
    def __call__(self, step: int, micro: int, pos: str, neg: str) -> Batch:
        cfg, model = self.cfg, self.model
        indices = self.indices(micro)
        if self.offline_at(step):  # x0: VAE latents of real images, fresh noise
            prompts, x0, eps = self.offline.batch(model, step, indices, self.global_batch)
            cond = model.encode_prompts(prompts)
        else:
            prompts = [self.prompts[self.order[(step * self.global_batch + i) % len(self.prompts)]] for i in indices]
            eps = rollout_noise(model, cfg, step, indices)
            cond = model.encode_prompts(prompts)
            x0 = None
            if self.algorithm.needs_rollout:
                x0 = rollout(model, cond, eps, steps=cfg.rollout.steps, guidance=cfg.rollout.guidance)
        return Batch(prompts, cond, x0, eps, step, indices, pos, neg, loss_scale=1.0 / self.per_rank)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def update(model, algorithm, optimizer, params, batches: Batches, cfg, ctx, step: int) -> dict:
    """One optimizer update (collective under DDP / FSDP). Returns the metrics row: the mean of
    the algorithm's metrics over micro-steps and ranks, ``grad_norm``, ``skipped`` (a non-finite
    loss, reward or gradient skips the optimizer step on every rank) and the seconds spent making
    batches (``rollout_s``), in backward (``grad_s``) and in clip + step (``optimizer_s``)."""
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    pos, neg = control_words(cfg, step)
    stats, rollout_s, grad_s = [], 0.0, 0.0
    sync = parallel.GradSync(model.transformer, ctx, cfg)  # one reduction, in the last backward
    for micro in range(cfg.train.grad_accum):
        t1 = time.perf_counter()
        batch = batches(step, micro, pos, neg)
        batch.final, batch.sync = micro == cfg.train.grad_accum - 1, sync
        _sync(model.device)
        t2 = time.perf_counter()
        stats.append(algorithm.backward(model, batch))
        _sync(model.device)
        rollout_s, grad_s = rollout_s + t2 - t1, grad_s + time.perf_counter() - t2
    if not sync.on:
        raise RuntimeError(f"algorithm '{algorithm.name}' ended an update on a pass that does not reduce gradients: "
                           "its last pass must call batch.begin_pass(last=True)")
    t3 = time.perf_counter()
    grad_norm = parallel.clip_grad_norm(params, cfg.train.grad_clip, ctx)
    row = {k: sum(s[k] for s in stats if k in s) / len(stats) for k in stats[0]}
    row = parallel.all_mean({**row, "grad_norm": grad_norm}, ctx)
    finite = all(math.isfinite(row[k]) for k in ("loss", "reward", "grad_norm"))
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    _sync(model.device)
    end = time.perf_counter()
    return {"step": step + 1, **row, "skipped": int(not finite), "lr": cfg.train.lr,
            "offline": int(batches.offline_at(step)), "seconds": end - t0, "rollout_s": rollout_s,
            "grad_s": grad_s, "optimizer_s": end - t3, "pos_word": pos, "neg_word": neg}
