"""Tiny random-weight Qwen-Image: every component built in code (tokenizers included), for
the tests, the tiny configs and the benchmarks; nothing is downloaded."""

from __future__ import annotations

from functools import lru_cache

from ..errors import UserError
from .base import MODELS
from .qwen_image import (NEGATIVE_PROMPT, PROMPT_TEMPLATE, PROMPT_TEMPLATE_START_IDX, QWEN_IMAGE_SCHEDULER,
                         QwenImageModel)
from .tiny_text import byte_bpe, vocab_and_merges
from .twin import TinyTwin, seeded

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "golden", "silver", "dark", "bright"]
_THINGS = ["circle", "square", "triangle", "cube", "ball", "cat", "dog", "house", "tree", "car", "bird", "flower", "lighthouse", "mountain", "river", "boat", "apple", "chair", "table", "cup", "book", "lamp", "clock", "horse", "fish", "sign", "city", "road", "window", "door", "castle", "bridge"]
_PLACES = ["on a table", "in a garden", "at sunset", "on a white background", "in the grass", "by the sea", "in a forest", "on a street", "under the stars", "in a room", "at dusk", "in the snow", "near a lake", "with a sky"]
_LEADS = ["a photo of", "a painting of", "a drawing of", "a close up of", "a small", "a large", "two", "three", "an old", "a", "the"]


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A small byte-level BPE ``Qwen2Tokenizer`` (Qwen2's NFC + split regex + byte-level pipeline)
    trained on a fixed synthetic corpus of templated prompts: deterministic, built in well under a
    second, ~550 tokens; the Qwen2.5-VL special tokens sit after the BPE vocabulary and the template's
    prefix is the same 34 tokens as in Qwen's vocabulary."""
    from transformers import Qwen2Tokenizer

    lines = []
    for i, c in enumerate(_COLORS):
        for j, o in enumerate(_THINGS):
            lead, place = _LEADS[(i + j) % len(_LEADS)], _PLACES[(3 * i + j) % len(_PLACES)]
            text = PROMPT_TEMPLATE.format(f"{lead} {c} {o} {place}")
            for s in SPECIAL_TOKENS:
                text = text.replace(s, "\n")
            lines.append(text)
    vocab, merges = vocab_and_merges(byte_bpe(lines, 1024, min_frequency=2))
    for s in SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    prefix = tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids
    if len(prefix) != PROMPT_TEMPLATE_START_IDX:  # the pipeline drops exactly this many tokens
        raise RuntimeError(f"tiny Qwen tokenizer splits the template prefix into {len(prefix)} tokens, not 34")
    return tokenizer


def _tiny_modules(*, latent_channels: int = 4, vae_base_dim: int = 8, vae_dim_mult: tuple[int, ...] = (1, 2, 4),
                  vae_temporal_downsample: tuple[bool, ...] = (False, True), num_layers: int = 2,
                  attention_head_dim: int = 16, num_attention_heads: int = 2,
                  axes_dims_rope: tuple[int, int, int] = (8, 4, 4), text_dim: int = 32, text_layers: int = 2,
                  text_heads: int = 2, text_kv_heads: int = 1, mrope_section: tuple[int, ...] = (2, 3, 3),
                  vocab_size: int | None = None) -> dict:
    """The tiny modules (random init under the caller's RNG / device context)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if len(vae_temporal_downsample) != len(vae_dim_mult) - 1:
        raise UserError(f"tiny Qwen-Image vae_temporal_downsample needs {len(vae_dim_mult) - 1} entries "
                        f"(one per VAE downsampling), got {len(vae_temporal_downsample)}")
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * latent_channels, out_channels=latent_channels, num_layers=num_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=text_dim, guidance_embeds=False, axes_dims_rope=tuple(axes_dims_rope))
    c = latent_channels  # fixed, non-trivial per-channel statistics, so the normalisation is exercised
    vae = AutoencoderKLQwenImage(
        base_dim=vae_base_dim, z_dim=latent_channels, dim_mult=list(vae_dim_mult), num_res_blocks=1,
        temperal_downsample=list(vae_temporal_downsample),
        latents_mean=[round(-0.3 + 0.6 * i / max(c - 1, 1), 4) for i in range(c)],
        latents_std=[round(0.8 + 0.8 * i / max(c - 1, 1), 4) for i in range(c)])
    special = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    n = vocab_size if vocab_size is not None else len(tiny_tokenizer())
    base = n - len(SPECIAL_TOKENS)  # the special tokens close the tiny vocabulary
    ids = {k: base + v for k, v in special.items()}
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=text_layers,
                         num_attention_heads=text_heads, num_key_value_heads=text_kv_heads, vocab_size=n,
                         rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "mrope_section": list(mrope_section),
                                          "rope_theta": 1e6},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text_dim),
        vocab_size=n, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder)


def _build_tiny(cls, seed: int = 0, max_sequence_length: int = 64, negative_prompt: str = NEGATIVE_PROMPT,
                shift: float | None = None, quantize_timesteps: bool | None = None, decode_checkpointing: bool = True,
                **sizes) -> QwenImageModel:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = tiny_tokenizer()
    m = seeded(seed, _tiny_modules, **sizes)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)  # Qwen-Image's own
    return cls(m["transformer"], m["vae"], m["text_encoder"], tokenizer, scheduler,
               max_sequence_length=max_sequence_length, negative_prompt=negative_prompt, shift=shift,
               quantize_timesteps=quantize_timesteps, decode_checkpointing=decode_checkpointing)


@MODELS.register("tiny_qwen_image")
class TinyQwenImageModel(TinyTwin, QwenImageModel):
    """A tiny random Qwen-Image built in code (for tests and the lab); takes no path.

    The VAE downsamples by ``2 ** len(vae_temporal_downsample)`` (4 by default, so 32x48 pixels are
    8x12 latents, 4x6 packed tokens; sizes must be multiples of 8); ``text_dim`` is the Qwen2.5-VL
    width and the transformer's joint attention width. Also takes ``max_sequence_length`` (64),
    ``negative_prompt`` (" "), ``shift`` (a fixed-shift override), ``quantize_timesteps`` and
    ``decode_checkpointing``."""

    plan_ignore = ("decode_checkpointing",)  # planned by plan_decode, from the config's options
    build = staticmethod(_build_tiny)
    tiny_modules = staticmethod(_tiny_modules)


build_tiny_qwen_image = TinyQwenImageModel.random  # a random-weight QwenImageModel (deterministic in seed)
save_tiny_qwen_image = TinyQwenImageModel.save_random  # ... written as a full QwenImagePipeline folder
