"""Tiny random-weight FLUX (``tiny_flux``), built in code from the real diffusers / transformers classes.

Used by the tests (tiny defaults) and by the lab world (larger sizes via keyword arguments).
No T5 sentencepiece model is available offline, so *both* tokenizers are the CLIP BPE tokenizer
of :func:`srpo.tokenizer.clip_tokenizer`; the T5 encoder's vocabulary is sized to match.
FluxPipeline only calls ``tokenizer_2``, so the pipeline runs unchanged.
"""

from __future__ import annotations

from ..errors import UserError
from ..tokenizer import clip_tokenizer
from .base import MODELS
from .flux import CLIP_VOCAB, REFERENCE_SHIFT, FluxModel
from .twin import TinyTwin, seeded, tiny_vae


def _tiny_modules(*, latent_channels: int = 4, vae_channels: tuple[int, ...] = (8, 16), vae_groups: int = 8,
                  num_layers: int = 1, num_single_layers: int = 1, attention_head_dim: int = 16,
                  num_attention_heads: int = 2, axes_dims_rope: tuple[int, ...] = (4, 6, 6), text_dim: int = 32,
                  text_layers: int = 1, text_heads: int = 2, scaling_factor: float = 0.3611,
                  shift_factor: float = 0.1159) -> dict:
    """The tiny modules (random init under the caller's RNG / device context). The VAE
    downsamples by ``2 ** (len(vae_channels) - 1)``; ``text_dim`` is both the CLIP hidden size (the
    pooled projection) and the T5 ``d_model`` (the joint attention width). With the defaults
    almost all parameters are the two 49408-token embedding tables."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(axes_dims_rope) != attention_head_dim:
        raise UserError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to attention_head_dim "
                        f"{attention_head_dim}")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers,
        num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads, joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim, guidance_embeds=True, axes_dims_rope=tuple(axes_dims_rope),
    )
    vae = tiny_vae(vae_channels, latent_channels, vae_groups, scaling_factor=scaling_factor, shift_factor=shift_factor)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB, hidden_size=text_dim, intermediate_size=2 * text_dim,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=CLIP_VOCAB, d_model=text_dim, d_kv=text_dim // text_heads, d_ff=2 * text_dim,
        num_layers=text_layers, num_heads=text_heads, dropout_rate=0.0,
    ))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)


def _build_tiny(cls, seed: int = 0, max_sequence_length: int = 64, shift: float | None = None,
                quantize_timesteps: bool | None = None, **sizes) -> FluxModel:
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = seeded(seed, _tiny_modules, **sizes)
    shift = REFERENCE_SHIFT if shift is None else float(shift)
    tokenizer = clip_tokenizer()
    return cls(m["transformer"], m["vae"], m["text_encoder"], tokenizer, m["text_encoder_2"], tokenizer,
               scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False),
               max_sequence_length=max_sequence_length, shift=shift, quantize_timesteps=quantize_timesteps)


@MODELS.register("tiny_flux")
class TinyFlux(TinyTwin, FluxModel):
    """``tiny_flux``: a tiny random FLUX built in code (``path`` must be empty); sizes are the
    keywords of ``_tiny_modules`` plus ``max_sequence_length`` (64), ``shift`` (3) and
    ``quantize_timesteps``. A ``transformer_path`` (from ``save_transformer``) replaces the
    random transformer."""

    build = staticmethod(_build_tiny)
    tiny_modules = staticmethod(_tiny_modules)


build_tiny_flux = TinyFlux.random  # a random-weight FluxModel (deterministic in seed)
save_tiny_flux = TinyFlux.save_random  # ... written as a full FluxPipeline folder
