"""HPSv3: Qwen2-VL-7B-Instruct reading the image and HPSv3's instruction, with a reward head on
the hidden state of its ``<|Reward|>`` token.

The head (Linear(3584, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2)) predicts a
mean and a spread of the preference; the score is the mean, ``logits[:, 0]``, as HPSv3 reads it.
HPSv3 runs the language model with plain sequential positions (its forward passes no
multimodal rope positions), and so does srpo. Built on transformers' ``Qwen2VLModel`` (vision
tower + language model; the unused LM head is not built), loaded from a local Qwen2-VL folder
(config and tokenizer) and ``HPSv3.safetensors`` (every weight, the embeddings resized to the
tokenizer plus ``<|Reward|>``); the ``hpsv3`` package is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import REWARDS, RewardPlan, plan_sizes, starter
from .hpsv3_preprocess import IMAGE_TOKEN, PIXEL_BUDGET, REWARD_TOKEN, QwenVisionTransform, chat_text
from .joint import JointReward

TEXT_TOKENS = 520  # about the instruction's length in Qwen2's tokens (the plan's estimate)


def reward_head(hidden: int) -> nn.Sequential:
    """HPSv3's head; its indices 0, 3, 5 are the checkpoint's ``rm_head.{0,3,5}``."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


class HPSv3Reward(JointReward):
    """A frozen Qwen2-VL + HPSv3 head. ``tokenizer`` must know ``<|Reward|>``."""

    def __init__(self, model, head: nn.Module, tokenizer, transform: QwenVisionTransform | None = None,
                 divide_by: float = 1.0):
        super().__init__()
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.transform = transform or QwenVisionTransform()
        self.scale = 1.0 / float(divide_by)
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_id != model.config.image_token_id:
            raise UserError(f"the Qwen2-VL tokenizer's {IMAGE_TOKEN} is id {self.image_id}, the model config's "
                            f"image_token_id {model.config.image_token_id}: tokenizer and config do not belong together")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._ids: dict[str, list[int]] = {}
        self.frozen()

    def token_ids(self, prompt: str) -> list[int]:
        """The chat sequence's ids with one image placeholder (cached per prompt)."""
        if prompt not in self._ids:
            ids = self.tokenizer(chat_text(prompt)).input_ids
            if ids.count(self.reward_id) != 1 or ids.count(self.image_id) != 1:
                raise UserError(f"HPSv3 prompt {prompt[:40]!r} must not contain {REWARD_TOKEN} or {IMAGE_TOKEN}")
            self._ids[prompt] = ids
        return self._ids[prompt]

    def image_features(self, images: Tensor) -> Tensor:
        """[B, n, D] merged image tokens of the vision tower (differentiable in the images)."""
        visual = self.model.visual
        patches, grid = self.transform(images)
        out = visual(patches.to(visual.get_dtype()), grid_thw=grid).pooler_output
        return out.reshape(images.shape[0], -1, out.shape[-1])

    def pooled(self, feats: Tensor) -> Tensor:
        return feats.mean(1)

    def joint_score(self, feats: Tensor, prompts: list[str]) -> Tensor:
        b, n, _ = feats.shape
        if b != len(prompts):
            raise ValueError(f"{b} images but {len(prompts)} prompts")
        rows = []
        for p in prompts:  # the one placeholder becomes the image's n tokens
            ids = self.token_ids(p)
            i = ids.index(self.image_id)
            rows.append(ids[:i] + [self.image_id] * n + ids[i + 1:])
        length = max(len(r) for r in rows)
        device = feats.device
        ids = torch.tensor([r + [self.pad_id] * (length - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        lm = self.model.language_model
        embeds = lm.embed_tokens(ids)
        image_mask = (ids == self.image_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype).reshape(-1))
        hidden = lm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        at_reward = hidden[ids == self.reward_id]  # one per row, in row order
        with torch.autocast(device.type, enabled=False):
            logits = self.head(at_reward.to(torch.promote_types(at_reward.dtype, torch.float32)))
        return logits[:, 0]  # the predicted mean


# ---------------------------------------------------------------------- loading

def map_checkpoint_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HPSv3 checkpoint names (``Qwen2VLRewardModelBT`` under transformers 4.45: ``model.*`` the
    language model, ``visual.*``, ``lm_head.*``, ``rm_head.*``; or the later ``model.language_model.*``
    / ``model.visual.*``) -> srpo's (``model.language_model.*``, ``model.visual.*``, ``head.*``).
    The LM head is dropped: the score never reads it."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue
        if key.startswith("rm_head."):
            out["head." + key[len("rm_head."):]] = value
        elif key.startswith(("model.language_model.", "model.visual.")):
            out[key] = value
        elif key.startswith("visual."):
            out["model." + key] = value
        elif key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = value
        else:
            out[key] = value
    return out


def add_reward_token(tokenizer):
    """The tokenizer with HPSv3's ``<|Reward|>`` special token (added once)."""
    from tokenizers import AddedToken

    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(REWARD_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.padding_side = "right"
    return tokenizer


def _rebuild_rotary(model) -> None:
    """Rotary tables are buffers outside the state dict: recompute them after ``to_empty``."""
    for name, module in list(model.named_modules()):
        if "Rotary" in type(module).__name__:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], type(module)(module.config))


def _read_checkpoint(path) -> dict[str, Tensor]:
    if path is None:
        raise UserError("the HPSv3 reward needs a path: set path to HPSv3.safetensors")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"HPSv3 checkpoint not found: {file} (HPSv3.safetensors from the MizzenAI/HPSv3 release)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"HPSv3 checkpoint {file} is not a readable safetensors file: {e}") from None


def _qwen_parts(qwen_path):
    """(config, tokenizer) of a local Qwen2-VL folder."""
    if qwen_path is None:
        raise UserError("the HPSv3 reward needs options.qwen_path: a local Qwen2-VL-7B-Instruct folder")
    folder = Path(qwen_path).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"Qwen2-VL folder {folder} has no config.json (download Qwen/Qwen2-VL-7B-Instruct once)")
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type != "qwen2_vl":
        raise UserError(f"{folder} holds a {config.model_type} model, not Qwen2-VL (model_type qwen2_vl)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"Qwen2-VL folder {folder} has no usable tokenizer: {e}") from None
    return config, add_reward_token(tokenizer)


def build_qwen(config, device=None, dtype=None, attn: str = "sdpa"):
    """An empty ``Qwen2VLModel`` (no init, no LM head) on ``device``, ready for a state dict."""
    from transformers import Qwen2VLModel

    config._attn_implementation = attn
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attn
    with torch.device("meta"):
        model = Qwen2VLModel(config)
    model = model.to_empty(device=device or "cpu")
    _rebuild_rotary(model)
    return model.to(dtype) if dtype is not None else model


def load_weights(reward_parts: nn.Module, state: dict[str, Tensor], file) -> None:
    """Copy ``state`` (srpo names) into ``reward_parts``; any missing, extra or misshapen weight
    is a one-line error naming the file."""
    expected = reward_parts.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or extra or bad:
        what = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {extra[:3]}" if extra else "") + \
            (f" shape of {bad[0]}: {tuple(state[bad[0]].shape)} vs {tuple(expected[bad[0]].shape)}" if bad else "")
        raise UserError(f"{file} does not fit the Qwen2-VL config + HPSv3 head:{what.rstrip()} "
                        f"({len(missing)} missing, {len(extra)} unexpected, {len(bad)} misshapen)")
    with torch.no_grad():
        for k, v in reward_parts.state_dict().items():
            v.copy_(state[k])


class _Parts(nn.Module):
    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head


def from_files(path, qwen_path, device=None, dtype=None, **transform) -> HPSv3Reward:
    """HPSv3 from ``HPSv3.safetensors`` and a Qwen2-VL folder (config + tokenizer)."""
    state = map_checkpoint_keys(_read_checkpoint(path))
    config, tokenizer = _qwen_parts(qwen_path)
    embed = state.get("model.language_model.embed_tokens.weight")
    if embed is None:
        raise UserError(f"{path} has no language-model embeddings (model.embed_tokens.weight): not an HPSv3 checkpoint")
    if embed.shape[0] != len(tokenizer):
        raise UserError(f"{path} has {embed.shape[0]} token embeddings, the Qwen2-VL tokenizer plus {REWARD_TOKEN} "
                        f"{len(tokenizer)}: the checkpoint and the folder do not belong together")
    config.text_config.vocab_size = embed.shape[0]
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = build_qwen(config, device, dtype or embed.dtype)  # the checkpoint's precision by default
    parts = _Parts(model, reward_head(config.text_config.hidden_size).to(device))  # the head in float32, as HPSv3
    load_weights(parts, state, path)
    del state
    return HPSv3Reward(parts.model, parts.head, tokenizer, QwenVisionTransform(**transform))


# ---------------------------------------------------------------------- plan sizes

QWEN2_VL_7B = dict(  # Qwen2-VL-7B-Instruct's config.json
    text_config=dict(vocab_size=151658, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2),
)


def qwen_plan(config, min_pixels: int, max_pixels: int, text_tokens: int) -> RewardPlan:
    """Parameters (vision tower, language model, head; no LM head) counted on the meta device;
    activations as one stack of the language model's depth and width whose tokens hold the
    vision tower's share too: 2 texts (SRP's pos and neg) of text + image tokens, plus the vision
    tower's layers x width x patches in language-model units."""
    from transformers import Qwen2VLModel

    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2VLModel(config).parameters())
    n += sum(p.numel() for p in reward_head(config.text_config.hidden_size).parameters())
    t = QwenVisionTransform(min_pixels, max_pixels)
    side = int(max_pixels ** 0.5)
    image_tokens = t.tokens(side, side)
    patches = image_tokens * t.merge_size ** 2
    tc, vc = config.text_config, config.vision_config
    vision = vc.depth * vc.embed_dim * patches
    lm_units = tc.num_hidden_layers * tc.hidden_size
    tokens = 2 * (text_tokens + image_tokens) + -(-vision // lm_units)
    return RewardPlan(n, tc.num_hidden_layers, tc.hidden_size, tokens)


def plan(options: dict) -> RewardPlan:
    from transformers import Qwen2VLConfig

    return qwen_plan(Qwen2VLConfig(**QWEN2_VL_7B), int(options.get("min_pixels", PIXEL_BUDGET)),
                     int(options.get("max_pixels", PIXEL_BUDGET)), TEXT_TOKENS)


@REWARDS.register("hpsv3")
@starter("HPSv3", "HPSv3.safetensors", "the HPSv3 checkpoint HPSv3.safetensors of the hub repo MizzenAI/HPSv3",
         {"qwen_path": "Qwen2-VL-7B-Instruct"},
         "qwen_path: the Qwen2-VL-7B-Instruct folder from the hub (its config and tokenizer are read)")
@plan_sizes(plan)
def hpsv3(path=None, device=None, qwen_path=None, dtype=None, uint8: str | None = "pil",
          min_pixels: int = PIXEL_BUDGET, max_pixels: int = PIXEL_BUDGET, divide_by: float = 1.0) -> HPSv3Reward:
    """``path``: ``HPSv3.safetensors``; ``qwen_path``: the Qwen2-VL-7B-Instruct folder (its
    config and tokenizer; its weights are not read). ``dtype`` e.g. bfloat16 (HPSv3's own)."""
    reward = from_files(path, qwen_path, device=device, dtype=dtype, uint8=uint8, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    reward.scale = 1.0 / float(divide_by)
    return reward
