"""ImageReward: BLIP's ViT-L/16 image encoder, its BERT text encoder cross-attending to the image
tokens, and an MLP on the text's first ([CLS]) token, normalised by ImageReward's mean and std.

Built on transformers' ``BlipVisionModel`` and ``BlipTextModel`` (cross-attention on: BLIP's
``med`` BERT is the same module tree), loaded from ``ImageReward.pt`` (read weights-only) and its
``med_config.json``; the prompt is tokenized by bert-base-uncased's tokenizer plus BLIP's
``[DEC]`` and ``[ENC]`` tokens, padded to 35 tokens, as ImageReward does. The
``image-reward`` package is not needed. Images: shortest side to 224 (bicubic), centre crop,
OpenAI CLIP's normalisation, as its transform does on PIL images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import REWARDS, RewardPlan, plan_sizes, starter
from .joint import JointReward
from .preprocess import ImageTransform

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward's normalisation of the MLP output
MAX_LENGTH = 35
IMAGE_SIZE = 224


def mlp_head(width: int) -> nn.Sequential:
    """ImageReward's MLP (linear layers with dropout between, no activations): indices 0, 2, 4,
    6, 7 are the checkpoint's ``mlp.layers.*``."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def image_transform(uint8: str | None = "pil", size: int = IMAGE_SIZE) -> ImageTransform:
    """torchvision's Resize(size, bicubic) + CenterCrop(size) on a PIL image, ToTensor, Normalize."""
    return ImageTransform(size, (size, size), interpolation="bicubic", resize_mode="shortest",
                          crop_rounding="round", uint8=uint8)


class ImageRewardModel(nn.Module):
    """``vision`` (BlipVisionModel), ``text`` (BlipTextModel with cross-attention), ``mlp``."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = mlp_head(text_config.hidden_size)


class ImageRewardReward(JointReward):
    def __init__(self, model: ImageRewardModel, tokenizer, transform: ImageTransform | None = None,
                 divide_by: float = 1.0):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.transform = transform or image_transform()
        self.scale = 1.0 / float(divide_by)
        self.frozen()

    def image_features(self, images: Tensor) -> Tensor:
        """[B, 1 + patches, width] ViT tokens (after the final layer norm)."""
        vision = self.model.vision
        x = self.transform(images).to(vision.embeddings.patch_embedding.weight.dtype)
        return vision(pixel_values=x).last_hidden_state

    def pooled(self, feats: Tensor) -> Tensor:
        return feats[:, 0]

    def joint_score(self, feats: Tensor, prompts: list[str]) -> Tensor:
        if feats.shape[0] != len(prompts):
            raise ValueError(f"{feats.shape[0]} images but {len(prompts)} prompts")
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt").to(feats.device)
        out = self.model.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                              encoder_hidden_states=feats, is_decoder=False).last_hidden_state
        with torch.autocast(feats.device.type, enabled=False):
            cls = out[:, 0]
            r = self.model.mlp(cls.to(torch.promote_types(cls.dtype, torch.float32)))[:, 0]
        return (r - MEAN) / STD


# ---------------------------------------------------------------------- configs and names

def vision_config(width=1024, layers=24, heads=16, image_size=IMAGE_SIZE, patch_size=16):
    """BLIP's ViT ('large': width 1024, 24 layers, 16 heads, patch 16), timm's eps 1e-6."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                            hidden_act="gelu", layer_norm_eps=1e-6)


def text_config(med: dict, encoder_width: int):
    """``BlipTextConfig`` from a ``med_config.json`` (a BertConfig), cross-attending to
    ``encoder_width`` (ImageReward sets it to the ViT's width)."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise UserError("med_config.json must have add_cross_attention: true (ImageReward's BERT cross-attends)")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id", "bos_token_id",
            "sep_token_id", "eos_token_id")
    missing = [k for k in keys[:5] if k not in med]
    if missing:
        raise UserError(f"med_config.json lacks {', '.join(missing)}: expected a BERT config")
    return BlipTextConfig(**{k: med[k] for k in keys if k in med}, encoder_hidden_size=encoder_width,
                          is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


_VISION_FIXED = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                 "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                 "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}  # ViT's names -> BLIP's
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def map_checkpoint_key(key: str) -> str | None:
    """An ``ImageReward.pt`` name -> srpo's, or None for weights the score never reads
    (``blip.vision_proj``, ``blip.text_proj``, buffers)."""
    ve, te = "blip.visual_encoder.", "blip.text_encoder."
    if key.startswith("mlp.layers."):
        return "mlp." + key[len("mlp.layers."):]
    if key.startswith(te):
        rest = key[len(te):]
        return None if rest.endswith("position_ids") else "text." + rest
    if not key.startswith(ve):
        return None
    rest = key[len(ve):]
    if rest in _VISION_FIXED:
        return "vision." + _VISION_FIXED[rest]
    if rest.startswith("blocks."):
        _, i, tail = rest.split(".", 2)
        for old, new in _VISION_BLOCK.items():
            if tail.startswith(old + "."):
                return f"vision.encoder.layers.{i}.{new}{tail[len(old):]}"
    return None


def to_checkpoint_key(key: str) -> str:
    """srpo's name -> ``ImageReward.pt``'s (the inverse of :func:`map_checkpoint_key`)."""
    if key.startswith("mlp."):
        return "mlp.layers." + key[len("mlp."):]
    if key.startswith("text."):
        return "blip.text_encoder." + key[len("text."):]
    rest = key[len("vision."):]
    inverse = {v: k for k, v in _VISION_FIXED.items()}
    if rest in inverse:
        return "blip.visual_encoder." + inverse[rest]
    _, _, i, tail = rest.split(".", 3)
    for old, new in _VISION_BLOCK.items():
        if tail.startswith(new + "."):
            return f"blip.visual_encoder.blocks.{i}.{old}{tail[len(new):]}"
    raise KeyError(key)


def map_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        new = map_checkpoint_key(k)
        if new is not None:
            out[new] = v
    return out


def load_weights(model: ImageRewardModel, state: dict[str, Tensor], file) -> None:
    """Copy mapped weights in; a missing or misshapen one is a one-line error naming the file."""
    mapped = map_checkpoint(state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    bad = sorted(k for k in set(expected) & set(mapped) if expected[k].shape != mapped[k].shape)
    if missing or bad:
        detail = f"missing {missing[:3]}" if missing else \
            f"shape of {bad[0]}: {tuple(mapped[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}"
        raise UserError(f"{file} does not fit ImageReward's BLIP (ViT + med_config BERT + MLP): {detail} "
                        f"({len(missing)} missing, {len(bad)} misshapen)")
    model.load_state_dict(mapped, strict=False)


# ---------------------------------------------------------------------- loading

def _file(path, what: str, hint: str) -> Path:
    if path is None:
        raise UserError(f"the ImageReward reward needs {what} ({hint})")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"ImageReward {what} not found: {p} ({hint})")
    return p


def read_checkpoint(path) -> dict[str, Tensor]:
    file = _file(path, "a path: ImageReward.pt", "from the THUDM/ImageReward release")
    if file.is_dir():
        file = file / "ImageReward.pt"
        if not file.is_file():
            raise UserError(f"ImageReward checkpoint not found: {file}")
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything beyond tensors and containers
        raise UserError(f"{file} is not a weights-only checkpoint ({type(e).__name__}): "
                        "srpo reads only plain tensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{file} is not a state dict of tensors")
    return state


def bert_tokenizer(tokenizer_path):
    """bert-base-uncased's tokenizer from a local folder (or its vocab.txt), with BLIP's tokens."""
    p = _file(tokenizer_path, "options.tokenizer_path: a bert-base-uncased folder or vocab.txt",
              "google-bert/bert-base-uncased on the Hugging Face hub")
    vocab = p / "vocab.txt" if p.is_dir() else p
    if not vocab.is_file():
        raise UserError(f"no vocab.txt in {p}: expected bert-base-uncased's tokenizer files")
    return blip_tokenizer(vocab.read_text(encoding="utf-8").splitlines())


def blip_tokenizer(vocab: list[str]):
    """BERT's uncased WordPiece tokenizer over ``vocab`` (vocab.txt's lines), with BLIP's tokens."""
    from transformers import BertTokenizer

    return add_blip_tokens(BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True))


def add_blip_tokens(tokenizer):
    """BLIP's tokenizer: BERT's plus ``[DEC]`` (bos) and ``[ENC]``, ids 30522 and 30523 for
    bert-base-uncased, the vocabulary ImageReward's embeddings have."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    return tokenizer


def from_files(path, med_config, tokenizer_path, device=None, dtype=None, uint8="pil",
               vit: dict | None = None) -> ImageRewardReward:
    state = read_checkpoint(path)
    med_file = _file(med_config if med_config is not None else
                     (Path(path).expanduser().parent / "med_config.json" if path else None),
                     "options.med_config: med_config.json", "beside ImageReward.pt in THUDM/ImageReward")
    try:
        med = json.loads(med_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{med_file} is not a JSON file: {e}") from None
    tokenizer = bert_tokenizer(tokenizer_path)
    vc = vision_config(**(vit or {}))
    tc = text_config(med, encoder_width=vc.hidden_size)
    if len(tokenizer) != tc.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens with [DEC] and [ENC], med_config.json's "
                        f"vocab_size is {tc.vocab_size}: use bert-base-uncased's vocab.txt")
    with torch.device("meta"):
        model = ImageRewardModel(vc, tc)
    model = model.to_empty(device="cpu")
    model.text.embeddings.position_ids = torch.arange(tc.max_position_embeddings)[None]
    load_weights(model, state, path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype is not None:
        model.vision.to(dtype)
        model.text.to(dtype)  # the MLP stays in float32
    reward = ImageRewardReward(model, tokenizer, image_transform(uint8))
    return reward.to(device) if device is not None else reward


def plan_of(vc, tc) -> RewardPlan:
    """Parameters counted on the meta device; activations as the ViT's stack, with the text
    encoder's share (2 texts for SRP, 35 tokens, cross-attention on) added in ViT tokens."""
    with torch.device("meta"):
        n = sum(p.numel() for p in ImageRewardModel(vc, tc).parameters())
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    text = 2 * tc.num_hidden_layers * tc.hidden_size * MAX_LENGTH * 2  # self + cross attention blocks
    tokens += -(-text // (vc.num_hidden_layers * vc.hidden_size))
    return RewardPlan(n, vc.num_hidden_layers, vc.hidden_size, tokens)


BERT_BASE = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu",
                 pad_token_id=0, add_cross_attention=True)  # ImageReward's med_config.json


@REWARDS.register("imagereward")
@starter("ImageReward", "ImageReward.pt", "ImageReward.pt (med_config.json beside it) of the hub repo THUDM/ImageReward",
         {"tokenizer_path": "bert-base-uncased"},
         "tokenizer_path: bert-base-uncased's folder or vocab.txt, google-bert/bert-base-uncased")
@plan_sizes(lambda options: plan_of(vision_config(**(options.get("vit") or {})),
                                    text_config(BERT_BASE, vision_config(**(options.get("vit") or {})).hidden_size)))
def imagereward(path=None, device=None, med_config=None, tokenizer_path=None, dtype=None,
                uint8: str | None = "pil", divide_by: float = 1.0, vit: dict | None = None) -> ImageRewardReward:
    """``path``: ``ImageReward.pt`` (or its folder); ``med_config``: its ``med_config.json``
    (default: beside the checkpoint); ``tokenizer_path``: bert-base-uncased (folder or vocab.txt);
    ``vit``: BLIP ViT sizes {width, layers, heads} (default ImageReward's ViT-L: 1024, 24, 16)."""
    reward = from_files(path, med_config, tokenizer_path, device=device, dtype=dtype, uint8=uint8, vit=vit)
    reward.scale = 1.0 / float(divide_by)
    return reward
