"""A run from its config, up to its first update, in one order for the trainer, ``srpo bench``
and the benchmarks: the model, the reward function and the algorithm from their registries
(:func:`build`), then LoRA, precision, the parallel wrapper, the prompts encoded and the
optimizer (:func:`prepare`)."""

from __future__ import annotations

import torch

from .algorithms import ALGORITHMS
from .models import load_model
from .rewards.factory import build_reward
from .rewards.objective import reward_function


def objective(cfg, reward, ctx=None):
    """The reward function (with SRP when enabled) and the algorithm the config names, on a
    built (frozen) reward model; under FSDP (``ctx``) its image tower sharded first
    (``parallel.shard_reward``)."""
    if ctx is not None and ctx.strategy == "fsdp" and cfg.parallel.shard_reward:
        shard_reward(reward)
    reward_fn = reward_function(cfg, reward)
    return reward_fn, ALGORITHMS.get(cfg.algorithm)(cfg, reward_fn)


def shard_reward(reward) -> list[str]:
    """FSDP2 over the frozen image tower of every reward in ``reward`` (a mix: each of its terms)
    that declares one (:meth:`srpo.rewards.base.Reward.image_tower`): each block its own unit,
    then the tower, all resharded after their forward (gathered again for the backward to the
    pixels; no gradient of their own). Weights stay in their dtype; nothing else changes.
    Returns the sharded rewards' class names."""
    from torch.distributed.fsdp import fully_shard

    from .rewards.base import Reward

    done = []
    for r in [m for m in reward.modules() if isinstance(m, Reward)]:
        tower = r.image_tower()
        if tower is None:
            continue
        root, blocks = tower
        for block in blocks:
            fully_shard(block, reshard_after_forward=True)
        fully_shard(root, reshard_after_forward=True)
        done.append(type(r).__name__)
    return done


def build(cfg, device: torch.device, ctx=None):
    """Model, reward function (with SRP when enabled) and algorithm named by the config. With
    ``ctx`` (the trainer's), a folder's transformer may start as a skeleton
    (:func:`srpo.parallel.skeleton_start`), which :func:`prepare` fills after the encoding pass."""
    from .parallel import skeleton_start
    from .streaming import wanted

    stream = ctx is not None and wanted(cfg.memory.stream_text_encoders, cfg.memory.release_text_encoders,
                                        cfg.model.path)
    model = load_model(cfg.model, device, skeleton=ctx is not None and skeleton_start(cfg, ctx), stream_text=stream)
    if stream and ctx.rank == 0:
        print(f"streamed text encoders: {', '.join(type(m).__name__ for m in model.text_encoders())}, read one layer "
              f"at a time, {cfg.memory.text_encode_batch} prompts a pass", flush=True)
    if cfg.rollout.frames is not None:  # a video family's frame count (image families refuse it)
        model.set_frames(cfg.rollout.frames)
    if hasattr(model, "decode_frames"):  # a video family decodes with gradient only up to the scored frames
        from .rewards.objective import reward_frames

        model.decode_frames = reward_frames(cfg.reward)
    reward = build_reward(cfg.reward, device=device, training=True).frozen()
    return (model, *objective(cfg, reward, ctx))


def prepare(model, cfg, ctx, prompts: list[str], cache_dir=None, progress: bool = False, optimizer=None):
    """Everything between building the model and the first update, in this order (the trainer
    and the benchmarks both call it): LoRA adapters, ``memory.prepare`` (precision, fp32 master
    weights, checkpointing, frozen parts, the text cache), every prompt encoded once (into
    ``cache_dir`` on disk when given; there, over several processes, each rank encodes its share
    and reads the others') and the text encoders released when ``memory.release_text_encoders``,
    and the parallel wrapper. A skeleton transformer is read (whole, or each rank's FSDP shards)
    only after the encoding pass, so it is never resident beside the text encoders; a model
    already whole is wrapped first (FSDP shards it before the encoders run). Then the optimizer
    (``optimizer(params)`` when given, else the config's AdamW). Returns (trainable parameters,
    optimizer, prompts this process's text encoders encoded)."""
    from . import compilation, lora, memory, parallel, quantize
    from .shards import is_skeleton

    lora.apply(model, cfg.lora, seed=cfg.train.seed)  # adapters; no-op unless lora.enabled
    memory.prepare(model, cfg, sharded=ctx.strategy == "fsdp")
    skeleton = is_skeleton(model.transformer)
    if not skeleton:
        parallel.apply(model, cfg, ctx)
    encoded = 0
    if cfg.memory.text_cache_dir or cfg.memory.release_text_encoders:  # every prompt once, then maybe no encoders
        unique, key = list(dict.fromkeys(prompts)), memory.text_cache_key(cfg)
        if cache_dir is not None and ctx.distributed and ctx.world > 1:  # this rank's share, then the others' from disk
            encoded = memory.pre_encode(model, unique[ctx.rank::ctx.world], cache_dir, key, progress=progress)
            parallel.barrier(ctx)
        encoded += memory.pre_encode(model, unique, cache_dir, key, release=cfg.memory.release_text_encoders,
                                     progress=progress)
    if skeleton:
        parallel.apply(model, cfg, ctx)
    quantize.apply(model.transformer, cfg.model.quantize)  # a frozen base read whole: now (a skeleton: as read)
    compilation.apply(model.transformer, cfg.train.compile, sharded=ctx.strategy == "fsdp")  # at the first call
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    return params, optimizer(params) if optimizer is not None else make_optimizer(params, cfg), encoded


def adamw_kernel(cfg, device) -> str:
    """``train.adamw`` resolved: auto is fused on CUDA (no step temporaries), torch's default elsewhere."""
    kind = cfg.train.adamw
    return ("fused" if torch.device(device).type == "cuda" else "torch") if kind == "auto" else kind


def make_optimizer(params, cfg):
    t = cfg.train
    device = params[0].device if params else "cpu"
    fused = adamw_kernel(cfg, device) == "fused"
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                             fused=fused or None)
