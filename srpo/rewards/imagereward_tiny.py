"""A tiny random-weight ImageReward built in code (no download): BLIP's module tree at width 32
(2-layer ViT, patch 16 at 224 px; 2-layer BERT with cross-attention), ImageReward's MLP and
preprocessing, and a small uncased WordPiece vocabulary trained in code with BERT's specials."""

from __future__ import annotations

import json
import os

import torch

from .base import REWARDS, plan_sizes, starter
from .imagereward import (ImageRewardModel, ImageRewardReward, blip_tokenizer, image_transform, load_weights,
                          plan_of, text_config, to_checkpoint_key, vision_config)
from .srp import DEFAULT_NEG_WORDS, DEFAULT_POS_WORDS

TINY_VISION = dict(width=32, layers=2, heads=4)
BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CORPUS = ("a photo of a red cat", "an oil painting of a harbour at night", "a cat", "a dog on a beach",
          "a bowl of fruit on a wooden table", "portrait of an old man, dramatic lighting",
          *DEFAULT_POS_WORDS, *DEFAULT_NEG_WORDS)


def tiny_vocab() -> list[str]:
    """An uncased WordPiece vocabulary, fixed by construction (no training, so every build is the
    same): BERT's specials, the corpus's characters (alone and as ``##`` continuations), its words."""
    import re

    words = sorted({w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,-"))
    return [*BERT_SPECIAL, *chars, *(f"##{c}" for c in chars if c.isalnum()), *(w for w in words if len(w) > 1)]


def tiny_tokenizer(folder: str | None = None):
    """BLIP's tokenizer over the tiny vocabulary (also written to ``folder``/vocab.txt)."""
    vocab = tiny_vocab()
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(vocab) + "\n")
    return blip_tokenizer(vocab)


def tiny_med_config(vocab_size: int) -> dict:
    """A med_config.json (BertConfig) for the tiny text encoder."""
    return dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                hidden_dropout_prob=0.1, hidden_size=32, initializer_range=0.02, intermediate_size=64,
                layer_norm_eps=1e-12, max_position_embeddings=64, model_type="bert", num_attention_heads=4,
                num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=vocab_size,
                encoder_width=TINY_VISION["width"], add_cross_attention=True,
                bos_token_id=vocab_size - 2, sep_token_id=3, eos_token_id=3)  # [DEC], [SEP]


def tiny_configs(tokenizer):
    return vision_config(**TINY_VISION), text_config(tiny_med_config(len(tokenizer)), TINY_VISION["width"])


def tiny_weights(seed: int = 0, tokenizer=None) -> dict[str, torch.Tensor]:
    """Random weights in ``ImageReward.pt``'s names, normal(0, 0.1) (layer norms around 1), so
    the tiny score depends visibly on image and text."""
    vc, tc = tiny_configs(tokenizer or tiny_tokenizer())
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ImageRewardModel(vc, tc).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in sorted(shapes.items()):
        norm = ("LayerNorm" in k or "layer_norm" in k or "layernorm" in k) and k.endswith("weight")
        out[to_checkpoint_key(k)] = (1.0 if norm else 0.0) + 0.1 * torch.randn(shape, generator=g)
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(tc.max_position_embeddings)[None]
    return out


def build(seed: int = 0, device=None, weights: dict | None = None, uint8: str | None = "pil") -> ImageRewardReward:
    tokenizer = tiny_tokenizer()
    vc, tc = tiny_configs(tokenizer)
    model = ImageRewardModel(vc, tc)
    load_weights(model, weights if weights is not None else tiny_weights(seed, tokenizer), "tiny ImageReward")
    reward = ImageRewardReward(model, tokenizer, image_transform(uint8))
    return reward.to(device) if device is not None else reward


def save_tiny_imagereward(folder, seed: int = 0) -> dict[str, str]:
    """``ImageReward.pt``, ``med_config.json`` and a tokenizer folder (``vocab.txt``) in ``folder``;
    returns the ``imagereward`` factory's arguments for them."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = tiny_tokenizer(os.path.join(folder, "tokenizer"))
    ckpt = os.path.join(folder, "ImageReward.pt")
    torch.save(tiny_weights(seed, tokenizer), ckpt)
    med = os.path.join(folder, "med_config.json")
    with open(med, "w") as f:
        json.dump(tiny_med_config(len(tokenizer)), f, indent=1)
    return {"path": ckpt, "med_config": med, "tokenizer_path": os.path.join(folder, "tokenizer"),
            "vit": dict(TINY_VISION)}


@REWARDS.register("tiny_imagereward")
@starter("tiny random ImageReward", None, "random weights built in code for smoke tests: no files")
@plan_sizes(lambda options: plan_of(*tiny_configs(tiny_tokenizer())))
def build_tiny_imagereward(path=None, seed: int = 0, device=None, uint8: str | None = "pil") -> ImageRewardReward:
    """The tiny ImageReward with random weights from ``seed``, or from ``path`` (a weights-only
    file in ``ImageReward.pt``'s names, e.g. the parity fixture's)."""
    weights = None
    if path is not None:
        from .imagereward import read_checkpoint

        weights = read_checkpoint(path)
    return build(seed, device, weights, uint8)
