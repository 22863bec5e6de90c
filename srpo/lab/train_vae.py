"""Stage ``vae`` of ``srpo lab build``: a small AutoencoderKL (32x32 pixels -> 4x16x16 latents)
trained on renderer images; saved under ``base/vae``."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .training import (POOL, SEEDS, STEPS, _cosine_lr, _set_lr, _setup, render_pool, round_fp16, store_fp16,
                       to_float)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=32, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
    )


def train_vae(quick: bool = False, progress: bool = True):
    """The lab VAE with FLUX-style ``shift_factor`` / ``scaling_factor`` set from its latents."""
    q = int(quick)
    g = _setup(SEEDS["vae"])
    _, images = render_pool(POOL["vae"][q], SEEDS["vae"], progress)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    steps, batch = STEPS["vae"][q], 32
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for step in bar:
        _set_lr(opt, _cosine_lr(step, steps, 1e-3))
        x = to_float(images[torch.randint(len(images), (batch,), generator=g)]) * 2 - 1
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample(generator=g)).sample
        loss = (y - x).abs().mean() + F.mse_loss(y, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(to_float(images[:2048]) * 2 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1 / z.std().item(), 4))
    return vae


def vae_roundtrip(vae, images, batch: int = 512):
    """Images in [0, 1] through the VAE (posterior mode) and back, no grad."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch] * 2 - 1
            out.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def save_vae(vae, out: Path) -> None:
    round_fp16(vae)
    vae.save_pretrained(str(out / "base" / "vae"), safe_serialization=True)
    store_fp16(out / "base" / "vae")


def load_vae(out: Path):
    from diffusers import AutoencoderKL

    folder = out / "base" / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is missing: run the vae stage first")
    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval().requires_grad_(False)
