"""The training loop: prompts -> rollout -> algorithm loss -> optimizer step -> logs and checkpoints.

It knows nothing about which model, reward or algorithm it drives: :mod:`srpo.setup` builds
them from registries and prepares them (parallelism included) before the loop starts, and
:func:`srpo.step.update` is one update.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, export, parallel, setup, step as steps
from .guard import report
from .guard.monitor import Guard
from .config import Config, dump_config
from .data import load_prompts
from .errors import UserError
from .evaluate import generate, reward_metrics
from .offline import OfflineData
from .runlog import RunLog, import_wandb, plot_curves


class Diverged(UserError):
    """Too many consecutive updates had a non-finite loss, reward or gradient."""


def evaluate(model, reward_fn, cfg: Config, prompts: list[str]) -> tuple[dict, torch.Tensor]:
    d = cfg.data
    images = generate(model, prompts, d.eval_seed, d.eval_steps, d.eval_guidance, cfg.rollout.height, cfg.rollout.width)
    return reward_metrics(reward_fn, images, prompts, cfg.srp.pos_words[0], cfg.srp.neg_words[0]), images


def train(cfg: Config, output: str | Path, resume: bool = False) -> dict:
    output = Path(output)
    checkpoint.abandon()  # nothing in flight from an earlier run of this process
    ctx = parallel.setup(cfg)
    if parallel.restart_count() and not resume:  # torchrun --max-restarts restarted the workers after a failure
        resume = True
        if ctx.is_main:
            print(f"torchrun restart {parallel.restart_count()}: resuming from the newest checkpoint in {output}")
    t_start = time.perf_counter()
    offline = OfflineData.from_config(cfg)  # captioned real images for x0 (data.offline), or None
    prompts = load_prompts(cfg.data.prompts, column=cfg.data.prompt_column) or offline.captions  # every input is checked before anything is written
    eval_prompts = load_prompts(cfg.data.eval_prompts, "eval prompts", cfg.data.prompt_column)
    if cfg.log.wandb is not None:
        import_wandb()  # a missing wandb fails here, before a model is loaded or a file written
    model, reward_fn, algorithm = setup.build(cfg, ctx.device, ctx)
    log = RunLog(output, enabled=ctx.is_main, tensorboard=cfg.log.tensorboard, resume=resume,
                 wandb=cfg.log.wandb, config=cfg.model_dump(mode="json"))
    if ctx.is_main:
        (output / "config.yaml").write_text(dump_config(cfg))

    params, optimizer, _ = setup.prepare(  # LoRA, precision, sharding, every prompt encoded once, optimizer
        model, cfg, ctx, prompts + eval_prompts + (offline.captions if offline else []),
        output / "text_cache" if cfg.memory.text_cache_dir else None, progress=ctx.is_main and cfg.log.progress)
    t = cfg.train

    guard = Guard(cfg, reward_fn, eval_prompts, ctx.device) if cfg.guard.enabled and eval_prompts else None
    start = 0
    if resume:  # weights, optimizer, RNG states, data position and guard state of the newest checkpoint
        state = checkpoint.resume(output, model.transformer, optimizer, cfg, ctx)
        start = int(state["step"])
        log.truncate(start + 1)
        if guard is not None and "guard" in state:
            guard.load(state["guard"])

    summary: dict = {"algorithm": cfg.algorithm}
    last_eval: dict = {}
    if eval_prompts and start == 0:
        if guard is not None:  # the guard's images serve the before grid and metrics
            summary["eval_before"], _, _ = guard_step(guard, model, 0, log, ctx, "before.png")
        else:
            summary["eval_before"], images = evaluate(model, reward_fn, cfg, eval_prompts)
            log.grid(images, "before.png")
        log.write_json("eval_before.json", summary["eval_before"])

    batches = steps.Batches(cfg, model, algorithm, prompts, ctx, offline)
    bad, done, stopped = 0, start, None
    bar = tqdm(range(start, t.max_steps), initial=start, total=t.max_steps, desc="srpo train",
               disable=not (ctx.is_main and cfg.log.progress), dynamic_ncols=True)
    loop_start, model_s = time.perf_counter(), 0.0  # the loop's wall time against its model work
    for step in bar:
        row = steps.update(model, algorithm, optimizer, params, batches, cfg, ctx, step)
        model_s += row["seconds"]
        checkpoint.poll(ctx)  # a background checkpoint write that finished is published now
        bad = bad + 1 if row["skipped"] else 0
        done = step + 1
        if guard is not None and ((cfg.guard.every and done % cfg.guard.every == 0) or done == t.max_steps):
            name = "after.png" if done == t.max_steps else f"step-{done:06d}.png"
            last_eval, decision, seconds = guard_step(guard, model, done, log, ctx, name)
            row.update({f"guard/{k}": v for k, v in last_eval.items()}, guard_seconds=seconds)
            model_s += seconds
            if decision.best:
                export.save_final(model, output, cfg, ctx, name="best")  # best/ (LoRA merged), best-lora/
            if decision.stop is not None:
                stopped = decision.stop.text
                row["guard/stop"] = stopped
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row['reward']:.3f}")
        if bad >= t.max_bad_updates:
            save_checkpoint(output, done, model, optimizer, cfg, ctx, guard)  # = the last good weights: skips change nothing
            raise Diverged(f"{bad} consecutive updates had a NaN/Inf loss, reward or gradient (last at update {done}); "
                           f"lower train.lr or check the reward; the last good checkpoint is in {output / 'checkpoints'}")
        if stopped:
            break
        if guard is None and cfg.log.sample_every and done % cfg.log.sample_every == 0 and eval_prompts:
            t_eval = time.perf_counter()
            _, images = evaluate(model, reward_fn, cfg, eval_prompts)
            model_s += time.perf_counter() - t_eval
            log.grid(images, f"step-{done:06d}.png")
        if done < t.max_steps and cfg.log.checkpoint_every and done % cfg.log.checkpoint_every == 0:
            save_checkpoint(output, done, model, optimizer, cfg, ctx, guard, asynchronous=cfg.parallel.async_checkpoints)
    bar.close()
    loop_s = time.perf_counter() - loop_start  # logs, checkpoints and exports between updates included

    save_checkpoint(output, done, model, optimizer, cfg, ctx, guard)
    export.save_final(model, output, cfg, ctx)  # final/ (LoRA merged) and lora/; gathers FSDP shards
    if eval_prompts:
        if guard is not None:
            summary["eval_after"] = last_eval
        else:
            summary["eval_after"], images = evaluate(model, reward_fn, cfg, eval_prompts)
            log.grid(images, "after.png")
    if guard is not None and stopped and done != t.max_steps and ctx.is_main:  # the stop step's grid is after.png
        shutil.copyfile(output / "samples" / f"step-{done:06d}.png", output / "samples" / "after.png")
    if guard is not None:
        summary["guard"] = {"stopped_at": done if stopped else None, "rule": stopped, "best_step": guard.best_step,
                            "best_metric": guard.metric, "best_value": guard.best_value if guard.best_step else None}
        if ctx.is_main and stopped:
            print(f"guard: stopped after update {done}: {stopped}")
    summary.update(steps=done, seconds=time.perf_counter() - t_start, final=str(output / "final"),
                   loop_seconds=loop_s, model_seconds=model_s)
    log.write_json("summary.json", summary)
    if ctx.is_main:
        plot_curves(log.rows, ["loss", "reward", "grad_norm"], output / "curves.png", title="srpo train")
        report.write(output)
    log.close()
    parallel.teardown(ctx)  # all ranks leave together, then the process group is destroyed
    return summary


def guard_step(guard, model, step: int, log, ctx, grid_name: str):
    """One guard evaluation: its images become the step's sample grid; every rank takes rank 0's
    decision (the images are the same on every rank; this makes it certain)."""
    t0 = time.perf_counter()
    metrics, images = guard.evaluate(model)
    decision = parallel.broadcast_object(guard.decide(step, metrics), ctx)
    seconds = time.perf_counter() - t0  # the evaluation's cost (guard_seconds in metrics.jsonl)
    log.grid(images, grid_name)
    if step == 0:  # metrics.jsonl holds updates; the base evaluation is eval_before.json (and TensorBoard step 0)
        log.scalars(0, {f"guard/{k}": v for k, v in metrics.items()})
        log.write_json("guard_before.json", {"seconds": seconds})
    return metrics, decision, seconds


def save_checkpoint(output: Path, step: int, model, optimizer, cfg: Config, ctx, guard=None,
                    asynchronous: bool = False) -> None:
    """Collective: every rank contributes its shards and RNG states, rank 0 writes. ``asynchronous``
    (sharded checkpoints): written in the background, published at the next save; the last save of
    a run is synchronous."""
    extra = checkpoint.data_position(cfg, ctx, step)
    if guard is not None:
        extra["guard"] = guard.state()
    checkpoint.save(output, step, model.transformer, optimizer, extra=extra, keep=cfg.log.keep_checkpoints, ctx=ctx,
                    sharded=ctx.strategy == "fsdp" and cfg.parallel.sharded_checkpoints, asynchronous=asynchronous)
