"""FLUX.1-dev + HPSv2.1 at their real widths with random weights: the one builder of
``benchmarks/real_dims.py`` (CPU, few blocks, measured against ``srpo plan``) and
``benchmarks/gpu_update.py`` (GPU, all 19 + 38 blocks).

Real diffusers / transformers / open_clip classes: ``FluxTransformer2DModel`` (hidden 3072, 24
heads of 128, joint attention 4096, pooled 768, guidance embedding) with any number of double
and single blocks, FLUX.1-dev's 16-channel ``AutoencoderKL``, T5-XXL's encoder width (d_model
4096, d_ff 10240, 64 heads of 64, gated GELU) with few layers, CLIP-L's text model, and the
HPSv2.1 reward (open_clip ViT-H-14) through :func:`srpo.rewards.hps.random_hps`. No tokenizer
can be downloaded, so both text encoders read the offline CLIP BPE tokenizer, and T5's
vocabulary is the CLIP BPE's 49408 tokens (T5-XXL has 32128: 71 M more embedding parameters,
counted by the plan like every other parameter). ``TINY`` is the same code path at test size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

FLUX_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                       scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False)  # FLUX.1-dev's vae/config.json
CLIP_VOCAB = 49408


@dataclass(frozen=True)
class Dims:
    """Widths of every part; ``double`` / ``single``: transformer blocks."""

    double: int = 19
    single: int = 38
    heads: int = 24
    head_dim: int = 128
    rope: tuple[int, ...] = (16, 56, 56)
    t5: dict = field(default_factory=lambda: dict(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=2,
                                                  feed_forward_proj="gated-gelu"))
    clip: dict = field(default_factory=lambda: dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, projection_dim=768,
                                                    hidden_act="quick_gelu"))  # CLIP-L's text model
    vae: dict = field(default_factory=lambda: dict(FLUX_VAE_CONFIG))
    reward_arch: str = "ViT-H-14"  # an open_clip name or JSON config file
    text_tokens: int = 512  # T5 tokens (FLUX.1-dev's max_sequence_length)

    def blocks(self, double: int, single: int) -> "Dims":
        return replace(self, double=double, single=single)


REAL = Dims()
# the same classes at test size (seconds on a CPU); the reward's open_clip config is written by
# :func:`tiny_reward_arch`
TINY = Dims(double=1, single=1, heads=2, head_dim=16, rope=(4, 6, 6),
            t5=dict(d_model=32, d_kv=16, d_ff=64, num_heads=2, num_layers=1, feed_forward_proj="gated-gelu"),
            clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      projection_dim=32, hidden_act="quick_gelu"),
            vae=dict(FLUX_VAE_CONFIG, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                     norm_num_groups=8, sample_size=32),
            reward_arch="", text_tokens=16)
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


@contextlib.contextmanager
def _made(device, dtype):
    """Modules made on ``device`` with their weights in ``dtype`` (no float32 copy of a bf16 model)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def components(dims: Dims, device="cpu", transformer_dtype=torch.float32, frozen_dtype=torch.float32) -> dict:
    """The FLUX pipeline's modules with random weights on ``device`` (``meta``: shapes only, for
    the plan): the transformer in ``transformer_dtype``, VAE and text encoders in ``frozen_dtype``."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with _made(device, transformer_dtype):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * dims.vae["latent_channels"], num_layers=dims.double,
            num_single_layers=dims.single, attention_head_dim=dims.head_dim, num_attention_heads=dims.heads,
            joint_attention_dim=dims.t5["d_model"], pooled_projection_dim=dims.clip["hidden_size"],
            guidance_embeds=True, axes_dims_rope=tuple(dims.rope))
    with _made(device, frozen_dtype):
        return {"transformer": transformer, "vae": AutoencoderKL(**dims.vae),
                "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, max_position_embeddings=77,
                                                             **dims.clip)).eval(),
                "text_encoder_2": T5EncoderModel(T5Config(vocab_size=CLIP_VOCAB, dropout_rate=0.0, **dims.t5)).eval()}


def build_model(dims: Dims, device="cpu", base_dtype=torch.bfloat16, frozen_dtype=torch.bfloat16, seed: int = 0):
    """A :class:`~srpo.models.flux.FluxModel` of random weights: the transformer in
    ``base_dtype`` (``memory.prepare`` makes trainable weights float32), the VAE and text
    encoders in ``frozen_dtype`` (``model.dtype``)."""
    from ..models.flux import FluxModel
    from ..tokenizer import clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = components(dims, device, base_dtype, frozen_dtype)
    tok = clip_tokenizer()
    return FluxModel(parts["transformer"], parts["vae"], parts["text_encoder"], tok, parts["text_encoder_2"], tok,
                     max_sequence_length=dims.text_tokens)


def build_reward(dims: Dims, device="cpu", dtype=None, arch: str | None = None, seed: int = 1):
    """The HPSv2.1 reward at ``dims.reward_arch`` (or ``arch``) with random weights, frozen."""
    from ..rewards.hps import random_hps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return random_hps(arch or dims.reward_arch, device=device, dtype=dtype).frozen()


def plan_parts(dims: Dims, height: int, width: int):
    """:class:`~srpo.models.base.PlanParts` of exactly these components (meta device)."""
    from ..models.base import PlanParts

    parts = components(dims, "meta")
    vae = parts["vae"]
    factor = 2 ** (len(dims.vae["block_out_channels"]) - 1) * 2
    text = sum(p.numel() for k in ("text_encoder", "text_encoder_2") for p in parts[k].parameters())
    return PlanParts(f"FLUX.1-dev widths, {dims.double} + {dims.single} blocks", parts["transformer"], vae,
                     dict(vae.config), text, dims.text_tokens, (height // factor) * (width // factor))


def reward_arch_of(reward) -> tuple[int, int, int, int]:
    """(parameters, vision layers, vision width, vision tokens) of a built open_clip reward, the
    tuple :data:`srpo.memory.REWARD_ARCH` holds by name."""
    visual = reward.model.visual
    tokens = int(visual.positional_embedding.shape[0])
    return (sum(p.numel() for p in reward.parameters()), len(visual.transformer.resblocks),
            int(visual.transformer.width), tokens)


def config(mode: str, size: int, rollout_steps: int, device: str, *, rank: int = 64, tiny: bool = False,
           reward_dtype: str | None = None, reward_autocast: str = "auto", release: bool = True):
    """The run's :class:`~srpo.config.Config`: the trainer reads every setting from it and
    ``srpo plan`` estimates it. LoRA r``rank`` (alpha = rank) or a full fine-tune, batch 1, bf16
    base and autocast, activation checkpointing, one process; text encoders released after the
    prompts are encoded (``release``)."""
    from ..config import load_config

    reward = {"name": "hps", "options": {"dtype": reward_dtype} if reward_dtype else {}}
    return load_config({
        "model": {"name": "flux", "dtype": "bfloat16", "options": {"max_sequence_length": TINY.text_tokens
                                                                    if tiny else REAL.text_tokens}},
        "reward": reward,
        "rollout": {"steps": rollout_steps, "guidance": 1.0, "height": size, "width": size},
        "train": {"batch_size": 1, "autocast": "bf16", "reward_autocast": reward_autocast,
                  "gradient_checkpointing": True, "device": device, "max_steps": 1},
        "data": {"prompts": ["a photo of a red fox in the snow"]},
        "parallel": {"strategy": "none"},
        "lora": {"enabled": mode == "lora", "rank": rank, "alpha": rank},
        "memory": {"cache_text": True, "offload_frozen": False, "text_cache_dir": False,
                   "release_text_encoders": release},
    })


def plan_sizes(cfg, dims: Dims, reward_arch: tuple[int, int, int, int] | None = None):
    """``srpo plan``'s :class:`~srpo.memory.Sizes` of exactly this build: the family's counting
    (:func:`srpo.memory.model_sizes`) on :func:`plan_parts`; the reward's tuple when given (a
    tiny reward), else the registry's HPS (ViT-H-14) entry."""
    from .. import memory

    sizes = memory.model_sizes(cfg, parts=plan_parts(dims, cfg.rollout.height, cfg.rollout.width))
    if reward_arch is not None:
        sizes.reward, sizes.reward_layers, sizes.reward_width, sizes.reward_tokens = reward_arch
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
    """The trainer's steps between building and the first update: :func:`srpo.step.prepare`
    (LoRA, precision, the parallel wrapper, every prompt encoded once and the text encoders
    released, the optimizer: ``optimizer(params)`` instead of the config's AdamW when given),
    then the trainer's reward function and algorithm (:func:`srpo.trainer.objective`)."""
    from .. import step as steps
    from ..trainer import objective

    prompts = list(cfg.data.prompts)
    params, opt, encoded = steps.prepare(model, cfg, ctx, prompts, optimizer=optimizer)
    reward_fn, algorithm = objective(cfg, reward)
    batches = steps.Batches(cfg, model, algorithm, prompts, ctx)
    return Run(model, reward_fn, algorithm, opt, params, batches, ctx, encoded)
