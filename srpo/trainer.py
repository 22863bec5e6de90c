"""The training loop: prompts -> rollout -> algorithm loss -> optimizer step -> logs and checkpoints.

It knows nothing about which model, reward or algorithm it drives: they come from registries,
and parallelism is applied by :mod:`srpo.parallel` before the loop starts.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, export, lora, memory, parallel, step as steps
from .algorithms import ALGORITHMS, RewardFn
from .config import Config, dump_config
from .data import load_prompts
from .errors import UserError
from .evaluate import generate, reward_metrics
from .models import load_model
from .offline import OfflineData
from .rewards.factory import build_reward
from .rewards.srp import SRP
from .runlog import RunLog, plot_curves


class Diverged(UserError):
    """Too many consecutive updates had a non-finite loss, reward or gradient."""


def reward_autocast(cfg: Config) -> str:
    """``train.reward_autocast``; auto: fp16 when the model autocasts (the reference), else none."""
    ra = cfg.train.reward_autocast
    return ra if ra != "auto" else ("fp16" if cfg.train.autocast != "none" else "none")


def build(cfg: Config, device: torch.device):
    """Model, reward function (with SRP when enabled) and algorithm named by the config."""
    model = load_model(cfg.model, device)
    reward = build_reward(cfg.reward, device=device, training=True).frozen()
    srp = None
    if cfg.srp.enabled:
        srp = SRP(reward, cfg.srp.pos_words, cfg.srp.neg_words, template=cfg.srp.template)
    reward_fn = RewardFn(reward, srp, reward_autocast(cfg))
    algorithm = ALGORITHMS.get(cfg.algorithm)(cfg, reward_fn)
    return model, reward_fn, algorithm


def evaluate(model, reward_fn, cfg: Config, prompts: list[str]) -> tuple[dict, torch.Tensor]:
    d = cfg.data
    images = generate(model, prompts, d.eval_seed, d.eval_steps, d.eval_guidance, cfg.rollout.height, cfg.rollout.width)
    return reward_metrics(reward_fn, images, prompts, cfg.srp.pos_words[0], cfg.srp.neg_words[0]), images


def train(cfg: Config, output: str | Path, resume: bool = False) -> dict:
    output = Path(output)
    ctx = parallel.setup(cfg)
    t_start = time.perf_counter()
    offline = OfflineData.from_config(cfg)  # captioned real images for x0 (data.offline), or None
    prompts = load_prompts(cfg.data.prompts) or offline.captions  # every input is checked before anything is written
    eval_prompts = load_prompts(cfg.data.eval_prompts, "eval prompts")
    model, reward_fn, algorithm = build(cfg, ctx.device)
    log = RunLog(output, enabled=ctx.is_main, tensorboard=cfg.log.tensorboard, resume=resume)
    if ctx.is_main:
        (output / "config.yaml").write_text(dump_config(cfg))

    lora.apply(model, cfg.lora, seed=cfg.train.seed)  # adapters; no-op unless lora.enabled
    memory.prepare(model, cfg)  # precision, fp32 master weights, checkpointing, frozen parts, text cache
    parallel.apply(model, cfg, ctx)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    optimizer = steps.make_optimizer(params, cfg)
    t = cfg.train

    start = 0
    if resume:  # weights, optimizer, RNG states and data position of the newest checkpoint
        start = checkpoint.resume(output, model.transformer, optimizer, cfg, ctx)
        log.truncate(start + 1)

    summary: dict = {"algorithm": cfg.algorithm}
    if eval_prompts and start == 0:
        summary["eval_before"], images = evaluate(model, reward_fn, cfg, eval_prompts)
        log.grid(images, "before.png")
        log.write_json("eval_before.json", summary["eval_before"])

    batches = steps.Batches(cfg, model, algorithm, prompts, ctx, offline)
    bad = 0
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, desc="srpo train",
               disable=not (ctx.is_main and cfg.log.progress), dynamic_ncols=True)
    for step in bar:
        row = steps.update(model, algorithm, optimizer, params, batches, cfg, ctx, step)
        bad = bad + 1 if row["skipped"] else 0
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row['reward']:.3f}")
        if bad >= t.max_bad_updates:
            save_checkpoint(output, step + 1, model, optimizer, cfg, ctx)  # = the last good weights: skips change nothing
            raise Diverged(f"{bad} consecutive updates had a NaN/Inf loss, reward or gradient (last at update {step + 1}); "
                           f"lower train.lr or check the reward; the last good checkpoint is in {output / 'checkpoints'}")
        done = step + 1
        if cfg.log.sample_every and done % cfg.log.sample_every == 0 and eval_prompts:
            _, images = evaluate(model, reward_fn, cfg, eval_prompts)
            log.grid(images, f"step-{done:06d}.png")
        if done < t.max_steps and cfg.log.checkpoint_every and done % cfg.log.checkpoint_every == 0:
            save_checkpoint(output, done, model, optimizer, cfg, ctx)
    bar.close()

    save_checkpoint(output, t.max_steps, model, optimizer, cfg, ctx)
    export.save_final(model, output, cfg, ctx)  # final/ (LoRA merged) and lora/; gathers FSDP shards
    if eval_prompts:
        summary["eval_after"], images = evaluate(model, reward_fn, cfg, eval_prompts)
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
