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


# Families built through their tiny twin's builder at the flagship's widths (the family's own
# constants: srpo/models/<family>.py), the transformer depth from ``Dims.double`` (and
# ``Dims.single`` where the family has single-stream blocks), the text encoder of the real class at
# its real hidden width with ``Dims.t5_layers`` layers (its MLP at twice the width, the twin's), and
# the flagship's VAE (``vae``: the family's constant config) in place of the twin's. ``tiny``: the
# twin's own test sizes at the same depths. FLUX.1-dev has its own builder (FluxModel.real_dims).
FAMILIES = ("flux", "flux2", "qwen_image", "sd3", "z_image")
TITLES = {"flux": "FLUX.1-dev", "flux2": "FLUX.2 [dev]", "qwen_image": "Qwen-Image", "sd3": "SD3.5 Large",
          "z_image": "Z-Image-Turbo"}
DOUBLE_SINGLE = ("flux", "flux2")  # families with double- and single-stream blocks


def _twin_spec(name: str, tiny: bool):
    """(twin family, real-width size keywords, the depth keywords' names, the flagship VAE or
    None) of ``name``."""
    if name == "flux2":
        from ..models import flux2 as f

        real = dict(latent_channels=f.FLUX2_VAE["latent_channels"], attention_head_dim=128,
                    num_attention_heads=f.FLUX2_DEV_TRANSFORMER["num_attention_heads"],
                    axes_dims_rope=f.FLUX2_DEV_TRANSFORMER["axes_dims_rope"],
                    timestep_guidance_channels=f.FLUX2_DEV_TRANSFORMER["timestep_guidance_channels"],
                    text_dim=f.MISTRAL_SMALL_3["text_config"]["hidden_size"],
                    text_heads=f.MISTRAL_SMALL_3["text_config"]["num_attention_heads"])
        return "tiny_flux2", real, ("num_layers", "num_single_layers", "text_layers"), \
            ("AutoencoderKLFlux2", f.FLUX2_VAE)
    if name == "qwen_image":
        from ..models import qwen_image as f

        t = f.QWEN_IMAGE_TRANSFORMER
        real = dict(latent_channels=f.QWEN_IMAGE_VAE["z_dim"], vae_base_dim=f.QWEN_IMAGE_VAE["base_dim"],
                    vae_dim_mult=tuple(f.QWEN_IMAGE_VAE["dim_mult"]),
                    vae_temporal_downsample=tuple(f.QWEN_IMAGE_VAE["temperal_downsample"]),
                    attention_head_dim=t["attention_head_dim"], num_attention_heads=t["num_attention_heads"],
                    axes_dims_rope=t["axes_dims_rope"], text_dim=t["joint_attention_dim"], text_heads=28,
                    text_kv_heads=4, mrope_section=(16, 24, 24))  # Qwen2.5-VL-7B: 28 heads of 128, 4 KV heads
        return "tiny_qwen_image", real, ("num_layers", None, "text_layers"), \
            ("AutoencoderKLQwenImage", f.QWEN_IMAGE_VAE)
    if name == "sd3":
        from ..models import sd3 as f

        t = f.SD35_LARGE_TRANSFORMER
        # one CLIP width for both CLIPs (the twin's): 1024, between CLIP-L's 768 and bigG's 1280,
        # their projections 2 x 1024 = the transformer's pooled 2048; T5-XXL's 4096, 64 heads of 64
        real = dict(latent_channels=f.SD3_VAE["latent_channels"], attention_head_dim=t["attention_head_dim"],
                    num_attention_heads=t["num_attention_heads"], sample_size=t["sample_size"],
                    pos_embed_max_size=t["pos_embed_max_size"], qk_norm=t["qk_norm"],
                    clip_dim=t["pooled_projection_dim"] // 2, clip_projection_dim=t["pooled_projection_dim"] // 2,
                    text_dim=t["joint_attention_dim"], text_heads=64, scaling_factor=f.SD3_VAE["scaling_factor"],
                    shift_factor=f.SD3_VAE["shift_factor"])
        return "tiny_sd3", real, ("num_layers", None, "text_layers"), ("AutoencoderKL", f.SD3_VAE)
    if name == "z_image":
        from ..models import z_image as f

        t = f.Z_IMAGE_TRANSFORMER
        real = dict(latent_channels=t["in_channels"], dim=t["dim"], n_heads=t["n_heads"],
                    n_refiner_layers=t["n_refiner_layers"], axes_dims=tuple(t["axes_dims"]),
                    axes_lens=tuple(t["axes_lens"]), text_dim=t["cap_feat_dim"],
                    text_heads=t["cap_feat_dim"] // f.QWEN3_4B["head_dim"], text_kv_heads=4,
                    scaling_factor=f.Z_IMAGE_VAE["scaling_factor"], shift_factor=f.Z_IMAGE_VAE["shift_factor"])
        return "tiny_z_image", real, ("n_layers", None, "text_layers"), ("AutoencoderKL", f.Z_IMAGE_VAE)
    raise ValueError(f"no real-dimension build of family {name!r}: use {', '.join(FAMILIES)}")


def _twin_model(dims: Dims, device, base_dtype, frozen_dtype, seed: int):
    """A family of :data:`FAMILIES` other than FLUX.1-dev (see :func:`_twin_spec`)."""
    import diffusers

    from ..models import MODELS
    from ..models.base import frozen
    from ..models.twin import made_in, seeded

    twin, real, (double, single, text), vae = _twin_spec(dims.model, dims.tiny)
    sizes = {} if dims.tiny else dict(real)
    sizes[double] = dims.double + (0 if single else dims.single)
    if single:
        sizes[single] = dims.single
    sizes[text] = dims.t5_layers
    if dims.model == "flux2":  # the pipeline reads three hidden states: those of the few layers
        n = dims.t5_layers
        sizes["text_encoder_out_layers"] = (max(n - 2, 0), max(n - 1, 0), n)
    if dims.model == "z_image" and not dims.tiny:
        sizes["text_positions"] = max(128, dims.text_tokens)
    cls = MODELS.get(twin)
    with made_in(device, frozen_dtype):
        model = cls.build(MODELS.get(cls.folder_family), seed, max_sequence_length=dims.text_tokens, **sizes)
        if not dims.tiny:  # the flagship's VAE, not the twin's one-resnet one
            vae_cls, vae_cfg = vae
            model.vae = frozen(seeded(seed + 1, getattr(diffusers, vae_cls), **vae_cfg))
    if base_dtype != frozen_dtype:
        torch.nn.Module.to(model.transformer, base_dtype)  # (diffusers' own .to warns about fp32 modules)
    return model


def build_model(dims: Dims, device="cpu", base_dtype=torch.bfloat16, frozen_dtype=torch.bfloat16, seed: int = 0):
    """The family's real-dimension model of random weights (FLUX.1-dev:
    ``family("flux").real_dims``; the others: :func:`_twin_model`): the transformer in
    ``base_dtype`` (``memory.prepare`` makes trainable weights float32), the VAE and text
    encoders in ``frozen_dtype`` (``model.dtype``); ``device="meta"``: shapes only."""
    from ..models import family

    if dims.model != "flux":
        return _twin_model(dims, device, base_dtype, frozen_dtype, seed)
    return family(dims.model).real_dims(dims.depths(), tiny=dims.tiny, device=device, dtype=base_dtype,
                                        frozen_dtype=frozen_dtype, seed=seed)


def build_reward(dims: Dims, device="cpu", dtype=None, arch: str | None = None, seed: int = 1):
    """The HPSv2.1 reward at ``dims.reward_arch`` (or ``arch``) with random weights, frozen."""
    from ..rewards.hps import random_hps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return random_hps(arch or dims.reward_arch, device=device, dtype=dtype).frozen()


def plan_parts(dims: Dims, height: int, width: int):
    """:class:`~srpo.models.base.PlanParts` of exactly this build (on the meta device): the
    family's own counting (``plan_of``) of its modules."""
    model = build_model(dims, "meta", torch.float32, torch.float32)
    if dims.model == "flux":
        return model.built_parts(height, width)
    text = sum(p.numel() for e in model.text_encoders() for p in e.parameters())
    return type(model).plan_of(f"{TITLES[dims.model]} widths, {dims.double} + {dims.single} blocks", model.transformer,
                               model.vae, text, model.max_sequence_length, height, width)


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
