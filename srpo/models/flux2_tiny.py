"""Tiny random-weight FLUX.2 [dev] and [klein]: every component built in code (tokenizers included), for
the tests, the tiny configs and the benchmarks; nothing is downloaded."""

from __future__ import annotations

import functools
import inspect

import torch

from ..errors import UserError
from .base import MODELS
from .flux2 import Flux2Base, Flux2Model
from .flux2_klein import Flux2KleinModel
from .tiny_text import byte_bpe, vocab_and_merges
from .twin import TinyTwin, seeded, tiny_vae

_WORDS = dict(
    adj=("red", "blue", "green", "yellow", "white", "black", "small", "large", "old", "shiny", "wooden", "glass",
         "bright", "dark", "tiny", "soft"),
    noun=("cube", "ball", "circle", "square", "triangle", "cat", "dog", "house", "tree", "car", "lighthouse",
          "flower", "bird", "table", "mountain", "boat"),
    place=("on a table", "in the grass", "at dusk", "at sunset", "by the sea", "in a forest", "in the snow",
           "on a white background", "in a garden", "on a green lawn", "under the sky", "in a city"),
)
MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Mistral-Small-3.x's chat template for the turns Flux2Pipeline sends (system + user, text blocks)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ('image', 'image_url') %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
)
# Qwen3's chat template for plain-text turns, with its enable_thinking switch
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def train_bpe(special: tuple[str, ...], vocab_size: int = 512):
    """A byte-level BPE (``tokenizers``, Qwen2's pre-tokenizer) trained on synthetic prompts and
    FLUX.2's system message; deterministic: the same vocabulary every build."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    w = _WORDS
    corpus = [f"a {a} {n} {p}" for a in w["adj"] for n in w["noun"] for p in w["place"]] + [SYSTEM_MESSAGE] * 20
    tok = byte_bpe(corpus, vocab_size, special, decoder=True)
    return tok


@functools.cache
def mistral_processor():
    """A ``PixtralProcessor`` (Flux2Pipeline's tokenizer component) over a tiny BPE with
    Mistral-Small-3's special tokens at their ids (``<s>`` 1, ``[INST]`` 3, ``[IMG]`` 10, ``<pad>``
    11, ``[SYSTEM_PROMPT]`` 17) and its chat template."""
    from transformers import (
        PixtralImageProcessor,
        PixtralProcessor,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(MISTRAL_SPECIAL), bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size=4, size={"longest_edge": 16}),
                            tokenizer=tokenizer, patch_size=4, spatial_merge_size=1, chat_template=MISTRAL_TEMPLATE)


@functools.cache
def qwen_tokenizer():
    """A ``Qwen2Tokenizer`` (Flux2KleinPipeline's tokenizer class) over a tiny BPE with Qwen3's
    chat tokens and chat template; pads with ``<|endoftext|>`` on the right, as Qwen's."""
    from transformers import Qwen2Tokenizer

    vocab, merges = vocab_and_merges(train_bpe(QWEN_SPECIAL))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges,
                               chat_template=QWEN3_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def _tiny_modules(klein: bool, *, latent_channels=4, vae_channels=(8, 16), vae_groups=8, num_layers=1,
                  num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 4, 4, 4),
                  timestep_guidance_channels=32, text_dim=16, text_layers=None, text_heads=2,
                  text_encoder_out_layers=None, guidance_embeds=None) -> dict:
    """The tiny modules (random init under the caller's RNG / device context). The text encoder
    has ``max(text_encoder_out_layers) + 1`` layers by default, so the pipeline's own layer
    indices (10, 20, 30) / (9, 18, 27) are intermediate hidden states, as in the real models."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    cls = Flux2KleinModel if klein else Flux2Model
    layers = tuple(text_encoder_out_layers or cls.default_layers)
    if sum(axes_dims_rope) != attention_head_dim or len(axes_dims_rope) != 4:
        raise UserError(f"tiny FLUX.2 axes_dims_rope {tuple(axes_dims_rope)} must be 4 numbers summing to "
                        f"attention_head_dim {attention_head_dim}")
    depth = int(text_layers or max(layers) + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=len(layers) * text_dim, timestep_guidance_channels=timestep_guidance_channels,
        axes_dims_rope=tuple(axes_dims_rope),
        guidance_embeds=(not klein) if guidance_embeds is None else bool(guidance_embeds),
    )
    vae = tiny_vae(vae_channels, latent_channels, vae_groups, AutoencoderKLFlux2)
    if vae.bn.running_mean.device.type != "meta":  # non-trivial latent statistics, so normalising shows
        vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.num_features))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
    head = text_dim // text_heads
    if klein:
        vocab = len(qwen_tokenizer())
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=vocab, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=depth,
            num_attention_heads=text_heads, num_key_value_heads=1, head_dim=head, max_position_embeddings=1024,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=0))
    else:
        vocab = len(mistral_processor().tokenizer)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=text_dim,
                             intermediate_size=2 * text_dim, num_hidden_layers=depth, num_attention_heads=text_heads,
                             num_key_value_heads=1, head_dim=head, max_position_embeddings=1024, rms_norm_eps=1e-5,
                             rope_theta=1e9, sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=11),
            vision_config=dict(model_type="pixtral", hidden_size=text_dim, intermediate_size=2 * text_dim,
                               num_hidden_layers=1, num_attention_heads=text_heads, head_dim=head, image_size=16,
                               patch_size=4, num_channels=3),
            image_token_index=10, spatial_merge_size=1, vision_feature_layer=-1, tie_word_embeddings=False))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_out_layers=layers)


TINY_SIZES = tuple(inspect.signature(_tiny_modules).parameters)[1:]  # the size keywords


def tiny_scheduler():
    """FLUX.2's scheduler config (diffusers' conversion script takes FLUX.1-dev's): shift 3,
    dynamic shifting (exponential), so the pipeline's empirical ``mu`` sets the schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _build_tiny(cls, seed: int = 0, max_sequence_length: int = 128, shift: float | None = None,
                quantize_timesteps: bool | None = None, negative_prompt: str = "", is_distilled: bool = False,
                **sizes):
    klein = issubclass(cls, Flux2KleinModel)
    unknown = set(sizes) - set(TINY_SIZES)
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(sorted(unknown))}")
    if not klein and (negative_prompt or is_distilled):
        raise TypeError("negative_prompt and is_distilled are options of tiny_flux2_klein")
    tokenizer = qwen_tokenizer() if klein else mistral_processor()  # built outside the forked RNG
    with torch.no_grad():
        m = seeded(seed, _tiny_modules, klein, **sizes)
    extra = dict(is_distilled=is_distilled, negative_prompt=negative_prompt) if klein else {}
    return cls(m["transformer"], m["vae"], m["text_encoder"], tokenizer, tiny_scheduler(),
               max_sequence_length=max_sequence_length, text_encoder_out_layers=m["text_encoder_out_layers"],
               shift=shift, quantize_timesteps=quantize_timesteps, **extra)


class _TinyFlux2(TinyTwin):
    """What the two FLUX.2 twins share (``load``: :class:`TinyTwin`). The VAE downsamples by ``2 **
    (len(vae_channels) - 1)`` (2 by default) and the pipeline's 2x2 patchify halves that again: 32x48
    pixels are ``[16, 8, 12]`` contract latents, 96 tokens. ``text_dim`` is the text encoder's hidden
    size (the transformer's joint width is three times it). Also takes ``max_sequence_length``
    (128), ``shift`` (a schedule override), ``quantize_timesteps``, ``text_encoder_out_layers``."""

    build = staticmethod(_build_tiny)
    plan_length = 128
    plan_ignore = ("is_distilled",)

    @classmethod
    def plan_modules(cls, max_len: int, sizes: dict) -> dict:
        return _tiny_modules(issubclass(cls, Flux2KleinModel), **sizes)

    @classmethod
    def plan_parts(cls, path, options: dict, height: int, width: int):
        distilled = bool((options or {}).get("is_distilled", False))
        return super().plan_parts(path, options, height, width, distilled=distilled)


@MODELS.register("tiny_flux2")
class TinyFlux2Model(_TinyFlux2, Flux2Model):
    """A tiny random FLUX.2 [dev] built in code (for tests and the lab); takes no path."""



@MODELS.register("tiny_flux2_klein")
class TinyFlux2KleinModel(_TinyFlux2, Flux2KleinModel):
    """A tiny random FLUX.2 [klein] built in code (Qwen3 text encoder, true CFG; ``is_distilled=True``
    for the step-distilled variant without CFG), for tests and the lab; sizes as ``tiny_flux2``,
    plus ``negative_prompt``; takes no path."""



build_tiny_flux2 = TinyFlux2Model.random  # a random-weight Flux2Model (deterministic in seed)
build_tiny_flux2_klein = TinyFlux2KleinModel.random  # a random-weight Flux2KleinModel


def save_tiny_flux2(path, seed: int = 0, klein: bool = False, **sizes) -> Flux2Base:
    """Write a tiny FLUX.2 (``klein`` for the Flux2KleinPipeline one) as a full pipeline folder
    (safetensors) and return it (:meth:`TinyTwin.save_random`)."""
    return (TinyFlux2KleinModel if klein else TinyFlux2Model).save_random(path, seed, **sizes)
