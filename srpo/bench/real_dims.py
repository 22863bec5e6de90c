"""FLUX.1-dev + HPSv2.1 at their real widths with random weights: the one builder of
``benchmarks/real_dims.py`` (CPU, few blocks, measured against ``srpo plan``) and
``benchmarks/gpu_update.py`` (GPU, all 19 + 38 blocks).

The model is the family's own real-dimension build, reached through the registry
(:meth:`~srpo.models.base.FlowModel.real_dims`: for FLUX the real diffusers / transformers classes
at FLUX.1-dev's, T5-XXL's and CLIP-L's widths, with any number of double and single blocks and few
T5 layers); the reward is HPSv2.1 (open_clip ViT-H-14) through :func:`srpo.rewards.hps.random_hps`.
``TINY`` is the same code path at test size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..models.base import DEFAULT_FAMILY

CLIP_VOCAB = 49408  # the offline CLIP BPE's (the tiny reward's text vocabulary)


@dataclass(frozen=True)
class Dims:
    """What is built: the family (``model``) at its real widths or at test widths (``tiny``) with
    ``double`` / ``single`` transformer blocks, ``t5_layers`` text-encoder layers and
    ``text_tokens`` T5 tokens; the reward's open_clip architecture."""

    model: str = DEFAULT_FAMILY  # a registered family with a real_dims build
    tiny: bool = False
    double: int = 19
    single: int = 38
    t5_layers: int = 2
    text_tokens: int = 512  # FLUX.1-dev's max_sequence_length
    reward_arch: str = "ViT-H-14"  # an open_clip name or JSON config file

    def blocks(self, double: int, single: int) -> Dims:
        return replace(self, double=double, single=single)

    def depths(self) -> dict:
        return dict(double=self.double, single=self.single, t5_layers=self.t5_layers, text_tokens=self.text_tokens)


REAL = Dims()
# the same classes at test size (seconds on a CPU); the reward's open_clip config is written by
# :func:`tiny_reward_arch`
TINY = Dims(tiny=True, double=1, single=1, t5_layers=1, text_tokens=16, reward_arch="")
TINY_REWARD = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB, "width": 32, "heads": 4, "layers": 2}}


def tiny_reward_arch(folder) -> str:
    """Write the tiny reward's open_clip config into ``folder``; returns its path (an ``arch``)."""
    import json
    from pathlib import Path

    path = Path(folder) / "real-dims-tiny-vit.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(TINY_REWARD))
    return str(path)


# the families' real-width builds live with the families (srpo/models/real_dims.py)
from ..models.real_dims import DOUBLE_SINGLE, FAMILIES, TITLES, build_model, plan_parts  # noqa: E402,F401


def build_reward(dims: Dims, device="cpu", dtype=None, arch: str | None = None, seed: int = 1):
    """The HPSv2.1 reward at ``dims.reward_arch`` (or ``arch``) with random weights, frozen."""
    from ..rewards.hps import random_hps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return random_hps(arch or dims.reward_arch, device=device, dtype=dtype).frozen()


def reward_arch_of(reward) -> tuple[int, int, int, int, int]:
    """(parameters, vision layers, vision width, vision tokens, image tower parameters) of a
    built open_clip reward, the fields of a :class:`~srpo.rewards.base.RewardPlan` (the tower:
    what ``parallel.shard_reward`` shards, :meth:`~srpo.rewards.base.Reward.image_tower`)."""
    visual = reward.model.visual
    tokens = int(visual.positional_embedding.shape[0])
    tower = reward.image_tower()
    return (sum(p.numel() for p in reward.parameters()), len(visual.transformer.resblocks),
            int(visual.transformer.width), tokens, sum(p.numel() for p in tower[0].parameters()) if tower else 0)


def config(mode: str, size: int, rollout_steps: int, device: str, *, rank: int = 64, tiny: bool = False,
           reward_dtype: str | None = None, reward_autocast: str = "auto", release: bool = True,
           family: str = REAL.model, procs: int = 1):
    """The run's :class:`~srpo.config.Config`: the trainer reads every setting from it and
    ``srpo plan`` estimates it. LoRA r``rank`` (alpha = rank) or a full fine-tune, batch 1, bf16
    base and autocast, activation checkpointing, one process (``procs`` > 1: FSDP2 over them,
    the reward's image tower sharded too); text encoders released after the prompts are encoded
    (``release``)."""
    from ..config import load_config

    reward = {"name": "hps", "options": {"dtype": reward_dtype} if reward_dtype else {}}
    return load_config({
        "model": {"name": family, "dtype": "bfloat16",
                  "options": {"max_sequence_length": TINY.text_tokens if tiny else REAL.text_tokens}},
        "reward": reward,
        "rollout": {"steps": rollout_steps, "guidance": 1.0, "height": size, "width": size},
        "train": {"batch_size": 1, "autocast": "bf16", "reward_autocast": reward_autocast,
                  "gradient_checkpointing": True, "device": device, "max_steps": 1},
        "data": {"prompts": ["a photo of a red fox in the snow"]},
        "parallel": {"strategy": "fsdp" if procs > 1 else "none"},
        "lora": {"enabled": mode == "lora", "rank": rank, "alpha": rank},
        "memory": {"cache_text": True, "offload_frozen": False, "text_cache_dir": False,
                   "release_text_encoders": release},
    })


def plan_sizes(cfg, dims: Dims, reward_arch: tuple[int, ...] | None = None):
    """``srpo plan``'s :class:`~srpo.plan.Sizes` of exactly this build: the family's counting
    (:func:`srpo.plan.model_sizes`) on :func:`plan_parts`; the reward's tuple when given (a
    tiny reward), else the registry's HPS (ViT-H-14) entry."""
    from .. import plan

    sizes = plan.model_sizes(cfg, parts=plan_parts(dims, cfg.rollout.height, cfg.rollout.width))
    if reward_arch is not None:  # (a 4-tuple from before the tower was counted: the registry's tower)
        sizes.reward, sizes.reward_layers, sizes.reward_width, sizes.reward_tokens = reward_arch[:4]
        if len(reward_arch) > 4:
            sizes.reward_tower = reward_arch[4]
    return sizes


@dataclass
class Run:
    """What one update needs, made in the trainer's order."""

    model: object
    reward_fn: object
    algorithm: object
    optimizer: object
    params: list
    batches: object
    ctx: object
    encoded: int  # prompts the text encoders encoded before they were released


def prepare_run(cfg, model, reward, ctx, optimizer=None) -> Run:
    """The trainer's steps between building and the first update: :func:`srpo.setup.prepare`
    (LoRA, precision, the parallel wrapper, every prompt encoded once and the text encoders
    released, the optimizer: ``optimizer(params)`` instead of the config's AdamW when given),
    then the trainer's reward function and algorithm (:func:`srpo.setup.objective`)."""
    from .. import setup
    from .. import step as steps

    prompts = list(cfg.data.prompts)
    params, opt, encoded = setup.prepare(model, cfg, ctx, prompts, optimizer=optimizer)
    reward_fn, algorithm = setup.objective(cfg, reward, ctx)
    batches = steps.Batches(cfg, model, algorithm, prompts, ctx)
    return Run(model, reward_fn, algorithm, opt, params, batches, ctx, encoded)
