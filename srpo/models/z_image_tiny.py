"""Tiny random-weight Z-Image: every component built in code (tokenizers included), for
the tests, the tiny configs and the benchmarks; nothing is downloaded."""

from __future__ import annotations

from functools import cache

from ..errors import UserError
from .base import MODELS
from .tiny_text import byte_bpe, vocab_and_merges
from .twin import TinyTwin, seeded, tiny_vae
from .z_image import CHAT_TEMPLATE, SPECIAL_TOKENS, ZImageModel, _check_variant

_WORDS = {
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey", "golden", "silver"],
    "thing": ["cube", "ball", "circle", "square", "triangle", "star", "cat", "dog", "bird", "horse", "tree", "flower", "house", "car", "boat", "robot", "lighthouse", "mountain", "river", "city", "portrait", "apple", "cup", "chair", "lamp"],
    "place": ["on a table", "in the grass", "at sunset", "over the sea", "in a garden", "on a white background", "at night", "in the rain", "under a bridge", "in a forest", "on the moon", "in a small room"],
    "style": ["a photo of", "a painting of", "a drawing of", "concept art of", "a detailed render of", "an anime picture of", "a realistic picture of", "natural lighting,"],
}


def _sentences() -> list[str]:
    out = ["user", "assistant", "system", "<think>", "</think>"]
    c, t, p, s = (_WORDS[k] for k in ("colour", "thing", "place", "style"))
    for i in range(600):
        out.append(f"{s[i % len(s)]} {'two' if i % 7 == 0 else 'a'} {c[i % len(c)]} {t[(i * 5) % len(t)]} "
                   f"{p[(i * 3) % len(p)]}")
    return out


@cache
def tiny_qwen_tokenizer(vocab_size: int = 640):
    """A small ``Qwen2Tokenizer``: a byte-level BPE with Qwen2's pre-tokenizer, trained on
    synthetic prompts (deterministic), the chat-template special tokens and the chat template."""
    return _build_tokenizer(vocab_size)


def _build_tokenizer(vocab_size: int):
    from transformers import Qwen2Tokenizer

    vocab, merges = vocab_and_merges(byte_bpe(_sentences(), vocab_size, SPECIAL_TOKENS))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)
    tok.add_tokens(list(SPECIAL_TOKENS[1:]), special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def _tiny_modules(*, vocab_size: int, latent_channels: int = 4, vae_channels: tuple[int, ...] = (8, 16),
                  vae_groups: int = 8, dim: int = 32, n_heads: int = 2, n_layers: int = 2,
                  n_refiner_layers: int = 1, axes_dims: tuple[int, ...] = (4, 6, 6),
                  axes_lens: tuple[int, ...] = (128, 64, 64), text_dim: int = 32, text_layers: int = 2,
                  text_heads: int = 2, text_kv_heads: int = 1, text_positions: int = 128,
                  scaling_factor: float = 0.3611, shift_factor: float = 0.1159) -> dict:
    """The tiny modules (random init under the caller's RNG / device context)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    if dim % n_heads or sum(axes_dims) != dim // n_heads:
        raise UserError(f"tiny Z-Image axes_dims {tuple(axes_dims)} must sum to the head width dim / n_heads "
                        f"= {dim // n_heads if dim % n_heads == 0 else dim / n_heads}")
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=dim, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=text_dim, rope_theta=256.0, t_scale=1000.0, axes_dims=list(axes_dims),
        axes_lens=list(axes_lens),
    )
    vae = tiny_vae(vae_channels, latent_channels, vae_groups, scaling_factor=scaling_factor, shift_factor=shift_factor)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, num_key_value_heads=text_kv_heads, head_dim=text_dim // text_heads,
        max_position_embeddings=text_positions, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
    ))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder)


def _build_tiny(cls, seed: int = 0, variant: str = "turbo", max_sequence_length: int = 64,
                negative_prompt: str = "", cfg_normalization: float = 0.0, cfg_truncation: float = 1.0,
                shift: float | None = None, quantize_timesteps: bool | None = None, **sizes) -> ZImageModel:
    from diffusers import FlowMatchEulerDiscreteScheduler

    _check_variant(variant, "tiny_z_image")
    tokenizer = tiny_qwen_tokenizer()
    sizes.setdefault("text_positions", max(128, int(max_sequence_length)))
    m = seeded(seed, _tiny_modules, vocab_size=len(tokenizer), **sizes)
    # Z-Image-Turbo's scheduler config: shift 3.0, no dynamic shifting
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return cls(m["transformer"], m["vae"], m["text_encoder"], tokenizer, scheduler, variant=variant,
               max_sequence_length=max_sequence_length, negative_prompt=negative_prompt,
               cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation, shift=shift,
               quantize_timesteps=quantize_timesteps)


@MODELS.register("tiny_z_image")
class TinyZImageModel(TinyTwin, ZImageModel):
    """A tiny random Z-Image built in code (for tests and the lab); takes no path.

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)`` (2 by default, so 32x48 pixels are
    16x24 latents, 8x12 patches); ``dim`` / ``n_heads`` is the transformer's head width, which
    ``axes_dims`` must sum to; ``text_dim`` is the Qwen3 hidden size and ``cap_feat_dim``. Also
    takes the load options ``variant`` (turbo), ``max_sequence_length`` (64), ``negative_prompt``,
    ``cfg_normalization``, ``cfg_truncation``, ``shift`` and ``quantize_timesteps``."""

    build = staticmethod(_build_tiny)
    plan_ignore = ("variant", "cfg_normalization", "cfg_truncation")

    @classmethod
    def plan_modules(cls, max_len: int, sizes: dict) -> dict:
        sizes.setdefault("text_positions", max(128, max_len))
        return _tiny_modules(vocab_size=len(tiny_qwen_tokenizer()), **sizes)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int):
        _check_variant((options or {}).get("variant", "turbo"), cls.family)
        return super().plan_parts(path, options, height, width)


build_tiny_z_image = TinyZImageModel.random  # a random-weight ZImageModel (deterministic in seed)
save_tiny_z_image = TinyZImageModel.save_random  # ... written as a full ZImagePipeline folder
