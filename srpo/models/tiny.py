"""Random-weight FLUX models built in code from the real diffusers / transformers classes.

Used by the tests (tiny defaults) and by the lab world (larger sizes via keyword arguments).
No T5 sentencepiece model is available offline, so *both* tokenizers are the CLIP BPE tokenizer
of :func:`srpo.tokenizer.clip_tokenizer`; the T5 encoder's vocabulary is sized to match.
FluxPipeline only calls ``tokenizer_2``, so the pipeline runs unchanged.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..tokenizer import clip_tokenizer
from . import MODELS
from .base import PlanParts
from .flux import FluxModel

CLIP_VOCAB = 49408


def build_tiny_flux(
    seed: int = 0,
    *,
    latent_channels: int = 4,
    vae_channels: tuple[int, ...] = (8, 16),
    vae_groups: int = 8,
    num_layers: int = 1,
    num_single_layers: int = 1,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    axes_dims_rope: tuple[int, ...] = (4, 6, 6),
    text_dim: int = 32,
    text_layers: int = 1,
    text_heads: int = 2,
    max_sequence_length: int = 64,
    scaling_factor: float = 0.3611,
    shift_factor: float = 0.1159,
    shift: float = 3.0,
    quantize_timesteps: bool | None = None,
) -> FluxModel:
    """A random-weight FLUX (deterministic in ``seed``; the global RNG is left untouched).

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)``; ``text_dim`` is both the CLIP hidden
    size (the pooled projection) and the T5 ``d_model`` (the joint attention width). With the
    defaults almost all parameters are the two 49408-token embedding tables.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(axes_dims_rope) != attention_head_dim:
        raise UserError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to attention_head_dim "
                        f"{attention_head_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=text_dim,
            pooled_projection_dim=text_dim, guidance_embeds=True, axes_dims_rope=tuple(axes_dims_rope),
        )
        n = len(vae_channels)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(vae_channels),
            layers_per_block=1, latent_channels=latent_channels, norm_num_groups=vae_groups,
            sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
            use_quant_conv=False, use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB, hidden_size=text_dim, intermediate_size=2 * text_dim,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
        ))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=CLIP_VOCAB, d_model=text_dim, d_kv=text_dim // text_heads, d_ff=2 * text_dim,
            num_layers=text_layers, num_heads=text_heads, dropout_rate=0.0,
        ))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    tokenizer = clip_tokenizer()
    return FluxModel(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer,
                     scheduler=scheduler, max_sequence_length=max_sequence_length, shift=shift,
                     quantize_timesteps=quantize_timesteps)


def save_tiny_flux(path, seed: int = 0, **sizes) -> FluxModel:
    """Write a tiny FLUX as a full FluxPipeline folder (safetensors) and return the model.

    ``FluxModel.from_pretrained(path, max_sequence_length=model.max_sequence_length)`` and
    ``FluxPipeline.from_pretrained(path)`` both load it offline.
    """
    return build_tiny_flux(seed, **sizes).save_pipeline(path)


class TinyFlux(FluxModel):
    """``tiny_flux``: a tiny random FLUX built in code (``path`` must be empty). A
    ``transformer_path`` (from ``save_transformer``) replaces the random transformer."""

    family = "tiny_flux"

    @classmethod
    def load(cls, path=None, transformer_path=None, device="cpu", dtype=torch.float32, shift=None,
             seed: int = 0, **sizes) -> FluxModel:
        if shift is not None:
            sizes["shift"] = shift
        return cls.load_tiny(lambda: build_tiny_flux(seed, **sizes), path, transformer_path, device, dtype, "flux")

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int) -> PlanParts:
        with torch.device("meta"):
            model = build_tiny_flux(**options)
        factor = model.vae_scale_factor * 2
        return PlanParts("tiny_flux", model.transformer, model.vae, dict(model.vae.config),
                         sum(p.numel() for e in model.text_encoders() for p in e.parameters()),
                         model.max_sequence_length, (height // factor) * (width // factor))


MODELS.register("tiny_flux")(TinyFlux)
