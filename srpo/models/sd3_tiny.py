"""Tiny random-weight SD3: every component built in code (tokenizers included), for
the tests, the tiny configs and the benchmarks; nothing is downloaded."""

from __future__ import annotations

from ..errors import UserError
from .base import MODELS
from .sd3 import CLIP_TOKENS, CLIP_VOCAB, SD3Model
from .twin import TinyTwin, seeded, tiny_vae


def _tiny_modules(*, latent_channels: int = 4, vae_channels: tuple[int, ...] = (8, 16), vae_groups: int = 8,
                  num_layers: int = 2, attention_head_dim: int = 8, num_attention_heads: int = 4,
                  patch_size: int = 2, sample_size: int = 32, pos_embed_max_size: int = 32,
                  qk_norm: str | None = "rms_norm", dual_attention_layers: tuple[int, ...] = (),
                  clip_dim: int = 16, clip_projection_dim: int = 32, text_dim: int = 32, text_layers: int = 2,
                  text_heads: int = 2, scaling_factor: float = 1.5035, shift_factor: float = 0.0609) -> dict:
    """The tiny modules (random init under the caller's RNG / device context)."""
    from diffusers import SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if 2 * clip_dim > text_dim:
        raise UserError(f"tiny SD3 text_dim {text_dim} must be at least twice clip_dim {clip_dim} (the "
                        f"two CLIP sequences are concatenated and padded to the T5 width)")
    inner = num_attention_heads * attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=num_layers, attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=text_dim, caption_projection_dim=inner, pooled_projection_dim=2 * clip_projection_dim,
        pos_embed_max_size=pos_embed_max_size, qk_norm=qk_norm, dual_attention_layers=tuple(dual_attention_layers),
    )
    vae = tiny_vae(vae_channels, latent_channels, vae_groups, scaling_factor=scaling_factor, shift_factor=shift_factor)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=CLIP_VOCAB, hidden_size=clip_dim, intermediate_size=2 * clip_dim,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=CLIP_TOKENS,
            projection_dim=clip_projection_dim,
        ))

    text_encoder, text_encoder_2 = clip(), clip()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=CLIP_VOCAB, d_model=text_dim, d_kv=text_dim // text_heads, d_ff=2 * text_dim,
        num_layers=text_layers, num_heads=text_heads, dropout_rate=0.0,
    ))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                text_encoder_3=text_encoder_3)


def _build_tiny(cls, seed: int = 0, max_sequence_length: int = 64, negative_prompt: str = "",
                shift: float | None = None, quantize_timesteps: bool | None = None, **sizes) -> SD3Model:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..tokenizer import clip_tokenizer

    m = seeded(seed, _tiny_modules, **sizes)
    tokenizer = clip_tokenizer()
    # SD3.5's scheduler config: shift 3.0, no dynamic shifting
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return cls(m["transformer"], m["vae"], m["text_encoder"], tokenizer, m["text_encoder_2"], tokenizer,
               m["text_encoder_3"], tokenizer, scheduler, max_sequence_length=max_sequence_length,
               negative_prompt=negative_prompt, shift=shift, quantize_timesteps=quantize_timesteps)


@MODELS.register("tiny_sd3")
class TinySD3Model(TinyTwin, SD3Model):
    """A tiny random SD3 built in code (for tests and the lab); takes no path.

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)`` (2 by default, so 32x48 pixels are 16x24
    latents, 8x12 patches); ``text_dim`` is the T5 ``d_model`` and the joint attention width, the
    two CLIPs have ``clip_dim`` hidden and ``clip_projection_dim`` pooled features. Also takes
    ``max_sequence_length`` (64), ``negative_prompt``, ``shift`` (a schedule override) and
    ``quantize_timesteps``."""

    build = staticmethod(_build_tiny)
    tiny_modules = staticmethod(_tiny_modules)


build_tiny_sd3 = TinySD3Model.random  # a random-weight SD3Model (deterministic in seed)
save_tiny_sd3 = TinySD3Model.save_random  # ... written as a full StableDiffusion3Pipeline folder
