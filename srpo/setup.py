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


def objective(cfg, reward):
    """The reward function (with SRP when enabled) and the algorithm the config names, on a
    built (frozen) reward model."""
    reward_fn = reward_function(cfg, reward)
    return reward_fn, ALGORITHMS.get(cfg.algorithm)(cfg, reward_fn)


def build(cfg, device: torch.device, ctx=None):
    """Model, reward function (with SRP when enabled) and algorithm named by the config. Under
    FSDP over several processes (``ctx``) a folder's transformer is built as a skeleton, which
    :func:`prepare` shards and fills shard by shard (:mod:`srpo.shards`)."""
    from .parallel import sharded_start

    model = load_model(cfg.model, device, skeleton=ctx is not None and sharded_start(cfg, ctx))
    reward = build_reward(cfg.reward, device=device, training=True).frozen()
    return (model, *objective(cfg, reward))


def prepare(model, cfg, ctx, prompts: list[str], cache_dir=None, progress: bool = False, optimizer=None):
    """Everything between building the model and the first update, in this order (the trainer
    and the benchmarks both call it): LoRA adapters, ``memory.prepare`` (precision, fp32 master
    weights, checkpointing, frozen parts, the text cache), the parallel wrapper (FSDP shards the
    model first, so no rank holds the whole model beside the text encoders), every prompt
    encoded once (into ``cache_dir`` on disk when given) and the text encoders released when
    ``memory.release_text_encoders``, then the optimizer (``optimizer(params)`` when given, else
    the config's AdamW). Returns (trainable parameters, optimizer, prompts the text encoders
    encoded)."""
    from . import lora, memory, parallel

    lora.apply(model, cfg.lora, seed=cfg.train.seed)  # adapters; no-op unless lora.enabled
    memory.prepare(model, cfg, sharded=ctx.strategy == "fsdp")
    parallel.apply(model, cfg, ctx)
    encoded = 0
    if cfg.memory.text_cache_dir or cfg.memory.release_text_encoders:  # every prompt once, then maybe no encoders
        encoded = memory.pre_encode(model, list(dict.fromkeys(prompts)), cache_dir, memory.text_cache_key(cfg),
                                    release=cfg.memory.release_text_encoders, progress=progress)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    return params, optimizer(params) if optimizer is not None else make_optimizer(params, cfg), encoded


def make_optimizer(params, cfg):
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
