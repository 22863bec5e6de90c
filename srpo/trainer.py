"""The training loop: prompts -> rollout -> algorithm loss -> optimizer step -> logs and checkpoints.

It knows nothing about which model, reward or algorithm it drives: they come from registries,
and parallelism is applied by :mod:`srpo.parallel` before the loop starts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint, export, lora, memory, parallel
from .algorithms import ALGORITHMS, RewardFn
from .algorithms.base import Batch, sample_rng, torch_seed
from .config import Config, dump_config
from .data import load_prompts
from .errors import UserError
from .evaluate import generate, reward_metrics
from .offline import OfflineData
from .models import MODELS
from .rewards.factory import build_reward
from .rewards.srp import SRP
from .runlog import RunLog, plot_curves
from .sampling import rollout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Diverged(UserError):
    """Too many consecutive updates had a non-finite loss, reward or gradient."""


def build(cfg: Config, device: torch.device):
    """Model, reward, SRP helper and algorithm named by the config."""

    m = cfg.model
    model = MODELS.get(m.name)(path=m.path, transformer_path=m.transformer_path, device=device,
                               dtype=DTYPES[m.dtype], **m.options)
    reward = build_reward(cfg.reward, device=device).frozen()
    srp = None
    if cfg.srp.enabled:
        srp = SRP(reward, cfg.srp.pos_words, cfg.srp.neg_words, template=cfg.srp.template)
    algorithm = ALGORITHMS.get(cfg.algorithm)(cfg, RewardFn(reward, srp))
    return model, reward, srp, algorithm


def control_words(cfg: Config, step: int) -> tuple[str, str]:
    pos, neg = cfg.srp.pos_words, cfg.srp.neg_words
    if cfg.srp.word_order == "cycle":
        return pos[step % len(pos)], neg[step % len(neg)]
    rng = sample_rng(cfg.train.seed, step, 0, 3)
    return pos[int(rng.integers(len(pos)))], neg[int(rng.integers(len(neg)))]


def rollout_noise(model, cfg: Config, step: int, indices: list[int]) -> torch.Tensor:
    """Shared noise depends on (seed, update); per-sample noise on (seed, update, index)."""
    shape = model.latent_shape(1, cfg.rollout.height, cfg.rollout.width)
    keys = [0] * len(indices) if cfg.train.shared_noise else indices
    return torch.cat([
        torch.randn(shape, generator=torch.Generator().manual_seed(torch_seed(cfg.train.seed, step, k, 2)))
        for k in keys
    ]).to(model.device)


def evaluate(model, reward, srp, cfg: Config, prompts: list[str]) -> tuple[dict, torch.Tensor]:
    d = cfg.data
    with memory.autocast(cfg, model.device):
        images = generate(model, prompts, d.eval_seed, d.eval_steps, d.eval_guidance, cfg.method.shift,
                          cfg.rollout.height, cfg.rollout.width)
    return reward_metrics(reward, srp, images, prompts, cfg.srp.pos_words[0], cfg.srp.neg_words[0]), images


def train(cfg: Config, output: str | Path, resume: bool = False) -> dict:
    output = Path(output)
    ctx = parallel.setup(cfg)
    t_start = time.perf_counter()
    offline = OfflineData.from_config(cfg)  # captioned real images for x0 (data.offline), or None
    prompts = load_prompts(cfg.data.prompts) or offline.captions  # every input is checked before anything is written
    eval_prompts = load_prompts(cfg.data.eval_prompts, "eval prompts")
    model, reward, srp, algorithm = build(cfg, ctx.device)
    log = RunLog(output, enabled=ctx.is_main, tensorboard=cfg.log.tensorboard, resume=resume)
    if ctx.is_main:
        (output / "config.yaml").write_text(dump_config(cfg))

    lora.apply(model.transformer, cfg.lora, seed=cfg.train.seed)  # adapters; no-op unless lora.enabled
    memory.prepare(model, cfg)  # fp32 master weights, checkpointing, frozen parts, text cache
    parallel.apply(model, cfg, ctx)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    t = cfg.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)

    start = 0
    if resume:  # weights, optimizer, RNG states and data position of the newest checkpoint
        start = checkpoint.resume(output, model.transformer, optimizer, cfg, ctx)
        log.truncate(start + 1)

    summary: dict = {"algorithm": cfg.algorithm}
    if eval_prompts and start == 0:
        summary["eval_before"], images = evaluate(model, reward, srp, cfg, eval_prompts)
        log.grid(images, "before.png")
        log.write_json("eval_before.json", summary["eval_before"])

    per_rank = t.batch_size * t.grad_accum
    global_batch = per_rank * ctx.world
    order = np.random.default_rng(t.seed).permutation(len(prompts))
    bad = 0
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, desc="srpo train",
               disable=not (ctx.is_main and cfg.log.progress), dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        pos, neg = control_words(cfg, step)
        stats = []
        for micro in range(t.grad_accum):
            indices = [ctx.rank * per_rank + micro * t.batch_size + j for j in range(t.batch_size)]
            if offline is not None and offline.active(step):  # x0: VAE latents of real images, fresh noise
                batch_prompts, x0, eps = offline.batch(model, step, indices, global_batch)
                cond = model.encode_prompts(batch_prompts)
            else:
                batch_prompts = [prompts[order[(step * global_batch + i) % len(prompts)]] for i in indices]
                eps = rollout_noise(model, cfg, step, indices)
                with torch.no_grad():
                    cond = model.encode_prompts(batch_prompts)
                    with memory.autocast(cfg, model.device):  # bf16 rollouts over fp32 master weights
                        x0 = rollout(model, cond, eps, steps=cfg.rollout.steps, shift=cfg.method.shift,
                                     guidance=cfg.rollout.guidance) if algorithm.needs_rollout else None
            batch = Batch(batch_prompts, cond, x0, eps, step, indices, pos, neg, loss_scale=1.0 / per_rank)
            stats.append(algorithm.backward(model, batch))
        grad_norm = parallel.clip_grad_norm(params, t.grad_clip, ctx)
        row = {k: sum(s[k] for s in stats if k in s) / len(stats) for k in stats[0]}
        row = parallel.all_mean({**row, "grad_norm": grad_norm}, ctx)
        finite = all(math.isfinite(row[k]) for k in ("loss", "reward", "grad_norm"))
        if finite:
            optimizer.step()
            bad = 0
        else:
            optimizer.zero_grad(set_to_none=True)
            bad += 1
        row = {"step": step + 1, **row, "skipped": int(not finite), "lr": t.lr,
               "offline": int(offline is not None and offline.active(step)),
               "seconds": time.perf_counter() - t0, "pos_word": pos, "neg_word": neg}
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row['reward']:.3f}")
        if bad >= t.max_bad_updates:
            save_checkpoint(output, step + 1, model, optimizer, cfg, ctx)  # = the last good weights: skips change nothing
            raise Diverged(f"{bad} consecutive updates had a NaN/Inf loss, reward or gradient (last at update {step + 1}); "
                           f"lower train.lr or check the reward; the last good checkpoint is in {output / 'checkpoints'}")
        done = step + 1
        if cfg.log.sample_every and done % cfg.log.sample_every == 0 and eval_prompts:
            _, images = evaluate(model, reward, srp, cfg, eval_prompts)
            log.grid(images, f"step-{done:06d}.png")
        if done < t.max_steps and cfg.log.checkpoint_every and done % cfg.log.checkpoint_every == 0:
            save_checkpoint(output, done, model, optimizer, cfg, ctx)
    bar.close()

    save_checkpoint(output, t.max_steps, model, optimizer, cfg, ctx)
    export.save_final(model, output, cfg, ctx)  # final/ (LoRA merged) and lora/; gathers FSDP shards
    if eval_prompts:
        summary["eval_after"], images = evaluate(model, reward, srp, cfg, eval_prompts)
        log.grid(images, "after.png")
    summary.update(steps=t.max_steps, seconds=time.perf_counter() - t_start, final=str(output / "final"))
    log.write_json("summary.json", summary)
    if ctx.is_main:
        plot_curves(log.rows, ["loss", "reward", "grad_norm"], output / "curves.png", title="srpo train")
    log.close()
    parallel.teardown(ctx)  # all ranks leave together, then the process group is destroyed
    return summary


def save_checkpoint(output: Path, step: int, model, optimizer, cfg: Config, ctx) -> None:
    """Collective: every rank contributes its shards and RNG states, rank 0 writes."""
    checkpoint.save(output, step, model.transformer, optimizer, extra=checkpoint.data_position(cfg, ctx, step),
                    keep=cfg.log.keep_checkpoints, ctx=ctx)
