"""Stage ``reward`` of ``srpo lab build``: a transformers CLIPModel, contrastive on renderer
images and captions plus synthetic preference pairs (the boosted copy wins); saved under ``reward/``."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .captions import caption
from .training import (POOL, SEEDS, STEPS, _cosine_lr, _set_lr, _setup, render_pool, round_fp16, store_fp16,
                       to_float)

REWARD_BETA = 20.0  # Bradley-Terry sharpness of the preference loss (cosine units)


def make_reward_model():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=28, patch_size=4, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=64, logit_scale_init_value=math.log(20.0),
    )
    return CLIPModel(config)


def reward_processor():
    """32 px images are resized (bicubic, antialiased) to 28 px: the reward's 4 px patches do not
    line up with the generator's 4 px tokens (2x2 latent patches), as for real models where the
    reward resizes to 224 px. Aligned grids make per-token adversarial patterns trivial to find."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})


def reward_augment(images, g):
    """Per image: shift by up to 2 px (reflect padding), scale brightness by 0.65-1.35 and each
    channel by 0.9-1.1, add a little noise. Photo-style scenes are darker on average (shading,
    shadows): without the brightness jitter the reward's 'photo' direction was mostly 'dark', and
    SRPO learnt to darken images instead of making them look like photos."""
    n = len(images)
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    dx, dy = torch.randint(5, (2, n), generator=g).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    gain = (0.65 + 0.7 * torch.rand(n, 1, 1, 1, generator=g)) * (0.9 + 0.2 * torch.rand(n, 3, 1, 1, generator=g))
    sigma = 0.03 * torch.rand(n, 1, 1, 1, generator=g)
    return (x * gain + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def hack_boost(images, g):
    """A copy of each image with more saturation, contrast and / or sharpening: the preferred
    side of the reward's synthetic preference pairs."""
    n = len(images)
    u = torch.rand(n, 3, generator=g)
    which = torch.randint(3, (n,), generator=g)  # 0: one edit, 1: two edits, 2: all three
    on = torch.rand(n, 3, generator=g).argsort(1) <= which[:, None]
    sat = torch.where(on[:, 0], 1.2 + 1.3 * u[:, 0], torch.ones(n))
    con = torch.where(on[:, 1], 1.15 + 0.65 * u[:, 1], torch.ones(n))
    shp = torch.where(on[:, 2], 0.6 + 1.4 * u[:, 2], torch.zeros(n))
    from .render import adjust

    return adjust(images, sat, con, shp)


def _clip_features(model, pixels, ids, mask, transform):
    f_img = model.get_image_features(pixel_values=transform(pixels))
    f_img = getattr(f_img, "pooler_output", f_img)
    f_txt = model.get_text_features(input_ids=ids, attention_mask=mask)
    f_txt = getattr(f_txt, "pooler_output", f_txt)
    return F.normalize(f_img, dim=-1), F.normalize(f_txt, dim=-1)


def train_reward(quick: bool = False, progress: bool = True):
    """The lab preference reward: a CLIPModel trained contrastively on renderer images and
    captions plus preference pairs (boosted copy wins, for its own caption and a random one)."""
    from ..rewards.preprocess import ImageTransform
    from ..tokenizer import clip_tokenizer

    q = int(quick)
    g = _setup(SEEDS["reward"])
    scenes, images = render_pool(POOL["reward"][q], SEEDS["reward"], progress)
    model = make_reward_model()
    model.logit_scale.requires_grad_(False)  # fixed at 20: the SRPO scale is logit_scale.exp() / 20 = 1
    proc = reward_processor()
    transform = ImageTransform.from_clip_processor(proc)  # exactly what CLIPReward applies
    tok = clip_tokenizer()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    steps, batch, pairs = STEPS["reward"][q], 96, 48
    bar = tqdm(range(steps), desc="reward", disable=not progress)
    for step in bar:
        _set_lr(opt, _cosine_lr(step, steps, 1e-3, warmup=150))
        idx = torch.randint(len(images), (batch,), generator=g)
        x = reward_augment(to_float(images[idx]), g)
        texts = [caption(scenes[i], g, style_prob=0.6) for i in idx.tolist()]
        t = tok(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        boosted = hack_boost(x[:pairs], g)
        f_img, f_txt = _clip_features(model, torch.cat([x, boosted]), t.input_ids, t.attention_mask, transform)
        logits = 20.0 * f_img[:batch] @ f_txt.T
        labels = torch.arange(batch)
        clip_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        # preference: boosted wins against its source for its own caption and for a random one
        other = torch.randint(batch, (pairs,), generator=g)
        txt = torch.stack([f_txt[:pairs], f_txt[other]])  # [2, pairs, D]
        margin = ((f_img[batch:] - f_img[:pairs])[None] * txt).sum(-1)
        pref_loss = F.softplus(-REWARD_BETA * margin).mean()
        loss = clip_loss + pref_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0:
            acc = (logits.argmax(1) == labels).float().mean().item()
            bar.set_postfix(clip=f"{clip_loss.item():.3f}", acc=f"{acc:.2f}", pref=f"{pref_loss.item():.3f}")
    return model.eval().requires_grad_(False), proc


def save_reward(model, proc, out: Path) -> None:
    round_fp16(model)
    folder = out / "reward"
    model.save_pretrained(str(folder), safe_serialization=True)
    proc.save_pretrained(str(folder))
    store_fp16(folder)
