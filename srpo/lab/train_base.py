"""Stage ``base`` of ``srpo lab build``: the FLUX transformer + CLIP and T5 text encoders, trained
jointly with the rectified-flow loss on VAE latents, then guidance distilled; saved under ``base/``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..tokenizer import write_clip_vocab
from .captions import caption
from .training import (POOL, SEEDS, STEPS, _cosine_lr, _set_lr, _setup, render_pool, round_fp16, store_fp16,
                       to_float)

MAX_SEQUENCE_LENGTH = 16  # T5 tokens per prompt (lab captions have at most 13)


def make_base_parts():
    """Random FLUX transformer + CLIP and T5 text encoders at the lab's sizes."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=49408, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
        pad_token_id=49407, eos_token_id=49407, decoder_start_token_id=49407,
    ))
    return transformer, clip, t5


def _ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def encode_latents(vae, images_u8, batch: int = 500, progress: bool = True):
    """Normalised VAE latents (posterior mode) of uint8 images."""
    cfg = vae.config
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images_u8), batch), desc="encode", disable=not progress, leave=False):
            z = vae.encode(to_float(images_u8[i:i + batch]) * 2 - 1).latent_dist.mode()
            out.append((z - cfg.shift_factor) * cfg.scaling_factor)
    return torch.cat(out)


CAPTION_DROPOUT = 0.1  # empty prompt: the unconditional velocity that guidance needs
GUIDANCE_RANGE = (1.0, 5.0)  # embedded guidance scales learnt by distillation (FLUX.1-dev style)
DISTILL_FROM = 0.6  # fraction of the steps after which half of each batch learns guided targets


def _velocity(parts, xs, sigma, ids, guidance, img_ids, txt_ids):
    """Velocity of FLUX parts (transformer, clip, t5) on unpacked latents, as the adapter calls it."""
    from ..models.flux import pack, unpack

    transformer, clip, t5 = parts
    v = transformer(hidden_states=pack(xs), timestep=sigma, guidance=guidance,
                    pooled_projections=clip(ids).pooler_output, encoder_hidden_states=t5(ids)[0],
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return unpack(v, xs.shape[-2], xs.shape[-1])


def train_base(vae, quick: bool = False, progress: bool = True):
    """Transformer and text encoders trained jointly with the rectified-flow loss, then guidance
    distilled: for half of each batch the target is the EMA teacher's classifier-free-guided
    velocity ``v(empty) + g (v(prompt) - v(empty))`` at a random scale ``g``, given to the
    transformer's guidance embedding (how FLUX.1-dev samples guided in one pass). Returns a
    FluxModel over the EMA weights and the given VAE."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..models.flux import FluxModel, image_ids
    from ..tokenizer import clip_tokenizer

    q = int(quick)
    g = _setup(SEEDS["base"])
    scenes, images = render_pool(POOL["base"][q], SEEDS["base"], progress)
    latents = encode_latents(vae, images, progress=progress)
    del images
    transformer, clip, t5 = make_base_parts()
    modules = torch.nn.ModuleList([transformer, clip, t5])
    ema = copy.deepcopy(modules).requires_grad_(False)
    tok = clip_tokenizer()

    def ids_of(texts):  # CLIP is causal: padding after the end token leaves its pooled output as is
        return tok(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                   return_tensors="pt").input_ids

    opt = torch.optim.AdamW(modules.parameters(), lr=5e-4, weight_decay=0.01)
    steps, batch = STEPS["base"][q], 64
    ids = dict(img_ids=image_ids(16, 16, "cpu", torch.float32), txt_ids=torch.zeros(MAX_SEQUENCE_LENGTH, 3))
    empty = ids_of([""])
    bar = tqdm(range(steps), desc="base", disable=not progress)
    for step in bar:
        _set_lr(opt, _cosine_lr(step, steps, 5e-4, warmup=200))
        idx = torch.randint(len(latents), (batch,), generator=g)
        x0 = latents[idx]
        texts = [caption(scenes[i], g, ordered=True) for i in idx.tolist()]
        drop = torch.rand(batch, generator=g) < CAPTION_DROPOUT
        sigma = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal, no shift at 64 tokens
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * eps
        target, guidance = eps - x0, torch.ones(batch)
        half = batch // 2 if step >= DISTILL_FROM * steps else 0
        if half:
            drop[:half] = False
            lo, hi = GUIDANCE_RANGE
            guidance[:half] = lo + (hi - lo) * torch.rand(half, generator=g)
            with torch.no_grad():
                both = torch.cat([ids_of(texts[:half]), empty.expand(half, -1)])
                v_c, v_u = _velocity(ema, xs[:half].repeat(2, 1, 1, 1), sigma[:half].repeat(2),
                                     both, torch.ones(2 * half), **ids).chunk(2)
            target = torch.cat([v_u + guidance[:half].view(-1, 1, 1, 1) * (v_c - v_u), target[half:]])
        texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        v = _velocity(modules, xs, sigma, ids_of(texts), guidance, **ids)
        loss = F.mse_loss(v, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        _ema_update(ema, modules, min(0.999, (1 + step) / (10 + step)))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer, clip, t5 = [m.eval().requires_grad_(False) for m in ema]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return FluxModel(transformer, vae, clip, tok, t5, tok, scheduler=scheduler,
                     max_sequence_length=MAX_SEQUENCE_LENGTH)


def save_base(model, out: Path) -> None:
    for m in (model.transformer, model.text_encoder, model.text_encoder_2):
        round_fp16(m)
    folder = out / "base"
    model.pipeline().save_pretrained(str(folder), safe_serialization=True)
    store_fp16(folder)
    for name in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt: 1.5 MB instead of 3.6 MB
        (folder / name / "tokenizer.json").unlink(missing_ok=True)
        write_clip_vocab(folder / name)
