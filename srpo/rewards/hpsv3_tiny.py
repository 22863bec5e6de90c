"""A tiny random-weight HPSv3 built in code (no download): a 2-layer Qwen2-VL (width 32) with
HPSv3's head, a byte-level BPE tokenizer with Qwen2-VL's special tokens and ``<|Reward|>``, and
HPSv3's real preprocessing (its full pixel budget)."""

from __future__ import annotations

import os

import torch

from .base import REWARDS, plan_sizes, starter
from .hpsv3 import HPSv3Reward, add_reward_token, build_qwen, qwen_plan, reward_head
from .hpsv3_preprocess import INSTRUCTION, PIXEL_BUDGET, QwenVisionTransform
from .srp import DEFAULT_NEG_WORDS, DEFAULT_POS_WORDS

QWEN2_VL_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Every size the tiny model has, flat (the fixture script builds upstream's config from these).
TINY_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                 mrope_section=[1, 1, 2], vision_depth=2, vision_embed_dim=32, vision_num_heads=4,
                 vision_mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

# Qwen2-VL-7B-Instruct's chat template, for one user turn of images/text (the tiny folder's).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(reward_token: bool = True):
    """Qwen2's byte-level BPE pipeline trained on HPSv3's instruction and a few prompts, with
    Qwen2-VL's special tokens (ids 0-13) and (``reward_token``) ``<|Reward|>`` last."""
    from transformers import Qwen2Tokenizer

    from ..models.tiny_text import byte_bpe, vocab_and_merges

    corpus = [INSTRUCTION, "system You are a helpful assistant. user assistant",
              "a photo of a red cat", "an oil painting of a harbour at night", "a cat", "a dog on a beach",
              *(f"{w}. " for w in DEFAULT_POS_WORDS + DEFAULT_NEG_WORDS)]
    vocab, merges = vocab_and_merges(byte_bpe(corpus, 640, QWEN2_VL_SPECIAL))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                         model_max_length=32768)
    tok.add_tokens(list(QWEN2_VL_SPECIAL[1:]), special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return add_reward_token(tok) if reward_token else tok


def tiny_config(tokenizer, dims: dict = TINY_DIMS):
    from transformers import Qwen2VLConfig

    d = dims
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=d["hidden_size"],
                         intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                         num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
                         rms_norm_eps=d["rms_norm_eps"], max_position_embeddings=d["max_position_embeddings"],
                         rope_parameters={"rope_type": "default", "rope_theta": d["rope_theta"],
                                          "mrope_section": list(d["mrope_section"])},
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(depth=d["vision_depth"], embed_dim=d["vision_embed_dim"], hidden_size=d["hidden_size"],
                           num_heads=d["vision_num_heads"], mlp_ratio=d["vision_mlp_ratio"],
                           patch_size=d["patch_size"], spatial_merge_size=d["spatial_merge_size"],
                           temporal_patch_size=d["temporal_patch_size"]),
        **ids)


def tiny_weights(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in HPSv3's checkpoint layout (``model.*``, ``visual.*``, ``lm_head.*``,
    ``rm_head.*``), normal(0, 0.1) so that the tiny score depends visibly on its inputs."""
    from transformers import Qwen2VLModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2VLModel(config).state_dict().items()}
    head = {k: v.shape for k, v in reward_head(config.text_config.hidden_size).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, items in (("", shapes), ("rm_head.", head)):
        for k, shape in sorted(items.items()):
            name = prefix + k
            if name.startswith("language_model."):
                name = "model." + name[len("language_model."):]
            if k.endswith("norm.weight") or "norm1" in k or "norm2" in k or k.endswith("ln_q.weight"):
                out[name] = 1 + 0.1 * torch.randn(shape, generator=g)
            else:
                out[name] = 0.1 * torch.randn(shape, generator=g)
    out["lm_head.weight"] = 0.1 * torch.randn(config.text_config.vocab_size, config.text_config.hidden_size, generator=g)
    return out


def build(seed: int = 0, device=None, weights: dict | None = None, **transform) -> HPSv3Reward:
    """The tiny HPSv3 from ``seed`` (or from ``weights`` in the checkpoint layout)."""
    from .hpsv3 import _Parts, load_weights, map_checkpoint_keys

    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer)
    parts = _Parts(build_qwen(config, device, torch.float32), reward_head(config.text_config.hidden_size).to(device))
    load_weights(parts, map_checkpoint_keys(weights if weights is not None else tiny_weights(config, seed)), "tiny HPSv3")
    return HPSv3Reward(parts.model, parts.head, tokenizer, QwenVisionTransform(**transform))


def save_tiny_hpsv3(folder, seed: int = 0) -> tuple[str, str]:
    """Write a tiny Qwen2-VL folder (config; tokenizer without ``<|Reward|>``, as Qwen's own)
    with ``HPSv3.safetensors`` in it; returns (checkpoint, folder)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = tiny_config(tiny_tokenizer())
    config.save_pretrained(folder)
    tiny_tokenizer(reward_token=False).save_pretrained(folder)
    ckpt = os.path.join(folder, "HPSv3.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_weights(config, seed).items()}, ckpt)
    return ckpt, str(folder)


def plan(options: dict):
    tokenizer = tiny_tokenizer()
    return qwen_plan(tiny_config(tokenizer), int(options.get("min_pixels", PIXEL_BUDGET)),
                     int(options.get("max_pixels", PIXEL_BUDGET)), 1200)


@REWARDS.register("tiny_hpsv3")
@starter("tiny random HPSv3", None, "random weights built in code for smoke tests: no files")
@plan_sizes(plan)
def build_tiny_hpsv3(path=None, seed: int = 0, device=None, uint8: str | None = "pil",
                     min_pixels: int = PIXEL_BUDGET, max_pixels: int = PIXEL_BUDGET) -> HPSv3Reward:
    """The tiny HPSv3 with random weights from ``seed``, or from ``path`` (a safetensors file in
    HPSv3's layout, e.g. the parity fixture's)."""
    weights = None
    if path is not None:
        from .hpsv3 import _read_checkpoint

        weights = _read_checkpoint(path)
    return build(seed, device, weights, uint8=uint8, min_pixels=min_pixels, max_pixels=max_pixels)
