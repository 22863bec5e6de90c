"""Tiny random-weight Wan 2.1 (``tiny_wan``) and Wan2.2-T2V-A14B (``tiny_wan_a14b``, two experts):
every component built in code (the tokenizer included), for the tests, the tiny configs and the
benchmarks; nothing is downloaded."""

from __future__ import annotations

from functools import cache

from ..errors import UserError
from .base import MODELS
from .twin import TinyTwin, seeded
from .wan import A14B_BOUNDARY_RATIO, WanModel
from .wan_experts import WanExperts, experts_folder

TINY_FRAMES = 5  # the twin's default frame count (2 latent frames): configs/tiny-wan.yaml's
_WORDS = (
    ["red", "blue", "green", "yellow", "white", "black", "golden", "small", "large", "old"],
    ["cube", "ball", "cat", "dog", "bird", "horse", "tree", "flower", "house", "car", "boat", "lighthouse",
     "river", "city", "robot", "apple", "mountain"],
    ["on a table", "in the grass", "at sunset", "at dusk", "over the sea", "in a garden", "near a lake",
     "in the rain", "at night", "on the moon", "walking", "running", "flying", "dancing"],
    ["a video of", "a photo of", "a slow shot of", "a painting of", "cinematic,", "natural lighting,", "a"],
)


def _corpus() -> list[str]:
    c, t, p, s = _WORDS
    return [f"{s[i % len(s)]} {c[i % len(c)]} {t[(i * 5) % len(t)]} {p[(i * 3) % len(p)]}" for i in range(500)]


@cache
def tiny_t5_tokenizer():
    """A small ``T5Tokenizer`` (the UMT5 tokenizer's class: a sentencepiece Unigram over Metaspace
    pieces, ``</s>`` appended, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) whose pieces are the
    words of synthetic prompts scored by their log frequency, and single characters (printable
    ASCII) far below them, so any text splits: deterministic, ~200 pieces."""
    import math
    import string
    from collections import Counter

    from transformers import T5Tokenizer

    words = Counter("\u2581" + w for line in _corpus() for w in line.split())
    total = sum(words.values())
    chars = ["\u2581", *sorted(set(string.printable.strip()))]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(w, math.log(n / total)) for w, n in sorted(words.items())]
    vocab += [(c, -20.0) for c in chars if c not in words]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _tiny_modules(*, vocab_size: int | None = None, latent_channels: int = 4, vae_base_dim: int = 4,
                  num_layers: int = 2, num_attention_heads: int = 2, attention_head_dim: int = 12, ffn_dim: int = 32,
                  freq_dim: int = 32, text_dim: int = 32, text_layers: int = 2, text_heads: int = 4) -> dict:
    """The tiny modules (random init under the caller's RNG / device context): a Wan VAE with the
    real 8x spatial / 4x temporal downsampling and non-trivial per-channel statistics."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
        in_channels=latent_channels, out_channels=latent_channels, text_dim=text_dim, freq_dim=freq_dim,
        ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    c = latent_channels
    vae = AutoencoderKLWan(
        base_dim=vae_base_dim, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[round(-0.3 + 0.6 * i / max(c - 1, 1), 4) for i in range(c)],
        latents_std=[round(0.8 + 0.8 * i / max(c - 1, 1), 4) for i in range(c)])
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size or len(tiny_t5_tokenizer()), d_model=text_dim, d_kv=text_dim // text_heads,
        d_ff=2 * text_dim, num_layers=text_layers, num_heads=text_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder.eval())


def _tiny_experts(**sizes) -> dict:
    """The tiny modules and a second transformer (the low-noise expert) of the same architecture."""
    m = _tiny_modules(**sizes)
    return dict(m, transformer_2=_tiny_modules(**sizes)["transformer"])


def _build_tiny(cls, seed: int = 0, max_sequence_length: int = 32, negative_prompt: str = "",
                shift: float | None = None, quantize_timesteps: bool | None = None, _make=_tiny_modules,
                decode_checkpointing: bool = True, **options) -> WanModel:
    from diffusers import FlowMatchEulerDiscreteScheduler

    two = {k: options.pop(k) for k in ("boundary_ratio", "train_experts", "guidance_scale_2") if k in options}
    m = seeded(seed, _make, **options)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # Wan 2.1's flow shift (480p)
    model = cls(m["transformer"], m["vae"], m["text_encoder"], tiny_t5_tokenizer(), scheduler,
                max_sequence_length=max_sequence_length, negative_prompt=negative_prompt, shift=shift,
                quantize_timesteps=quantize_timesteps, transformer_2=m.get("transformer_2"),
                decode_checkpointing=decode_checkpointing, **two)
    model.set_frames(TINY_FRAMES)
    return model


def _build_tiny_experts(cls, seed: int = 0, boundary_ratio: float = A14B_BOUNDARY_RATIO, **options) -> WanModel:
    return _build_tiny(cls, seed, _make=_tiny_experts, boundary_ratio=boundary_ratio, **options)


@MODELS.register("tiny_wan")
class TinyWanModel(TinyTwin, WanModel):
    """A tiny random Wan 2.1 built in code (for tests and the tiny config); takes no path.

    The VAE downsamples 8x in space and 4x in time (32x48 pixels, 5 frames are 2 x 4x6 latents,
    2 x 2x3 patches; sizes must be multiples of 16, frame counts 4k + 1); ``text_dim`` is the UMT5
    width and the transformer's ``text_dim``. Also takes ``max_sequence_length`` (32),
    ``negative_prompt`` (""), ``shift``, ``quantize_timesteps`` and ``decode_checkpointing``."""

    build = staticmethod(_build_tiny)
    tiny_modules = staticmethod(_tiny_modules)
    plan_length = 32
    plan_ignore = ("decode_checkpointing",)  # planned by plan_decode, from the config's options
    frames = TINY_FRAMES


@MODELS.register("tiny_wan_a14b")
class TinyWanA14BModel(TinyWanModel):
    """A tiny random Wan2.2-T2V-A14B: ``tiny_wan``'s modules with a second transformer, the low-noise
    expert, switched at ``boundary_ratio`` (0.875, the A14B's; at the twin's shift 3 that is level
    0.875, mid-trajectory for any step count above 2). Also takes ``train_experts`` and
    ``guidance_scale_2``. Its saved folders load with model ``wan``; ``transformer_path`` is a folder
    of both experts (a run's ``final/``)."""

    build = staticmethod(_build_tiny_experts)
    tiny_modules = staticmethod(_tiny_experts)
    title = "Wan2.2-T2V-A14B"

    @classmethod
    def load(cls, path=None, seed: int = 0, transformer_path=None, **kwargs):
        if transformer_path and not experts_folder(transformer_path):
            raise UserError(f"{transformer_path} is not a folder of both Wan experts (transformer/ and "
                            f"transformer_2/, as a two-expert run's final/): model '{cls.family}' has two")
        model = super().load(path, seed, **kwargs)
        if transformer_path:
            old, new = model.transformer, cls.read_experts(transformer_path)
            train = "both" if len(old.trained) == 2 else old.trained[0]
            model.transformer = WanExperts(new["transformer"], new["transformer_2"], old.boundary_timestep, train)
            model.transformer.to(device=model.vae.device, dtype=old.dtype)
            model._check_compatible()
        return model

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int, **extra):
        options = dict(options or {})
        train = options.pop("train_experts", None)
        for k in ("guidance_scale_2", "boundary_ratio"):
            options.pop(k, None)
        return super().plan_parts(path, options, height, width, experts=2, train_experts=train, **extra)


build_tiny_wan = TinyWanModel.random  # a random-weight WanModel (deterministic in seed)
save_tiny_wan = TinyWanModel.save_random  # ... written as a full WanPipeline folder
