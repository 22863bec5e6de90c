"""Held-out evaluation: sample prompts from fixed noise, score absolute and semantic-relative."""

from __future__ import annotations

import torch

from . import seeding
from .sampling import rollout


@torch.no_grad()
def generate(model, prompts: list[str], seed: int, steps: int, guidance: float,
             height: int, width: int, batch: int = 8, keys: list[int] | None = None) -> torch.Tensor:
    """Images of ``prompts`` from fixed noise: image i's noise is the key ``keys[i]`` (default i)."""
    keys = list(range(len(prompts))) if keys is None else list(keys)
    shape = model.latent_shape(1, height, width)
    images = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        noise = seeding.noise(shape, seed, 0, keys[s:s + batch], "eval_noise", device=model.device)
        x0 = rollout(model, model.encode_prompts(chunk), noise, steps=steps, guidance=guidance)
        images.append(model.decode(x0).float().cpu())
    return torch.cat(images)


@torch.no_grad()
def reward_metrics(reward_fn, images: torch.Tensor, prompts: list[str], pos: str, neg: str) -> dict[str, float]:
    """Mean absolute reward and, for text-conditioned rewards, mean SRP reward (paper form, k = 0)."""
    reward, srp = reward_fn.reward, reward_fn.srp
    device = next(iter(reward.parameters()), torch.empty(0)).device
    out, srp_vals = [], []
    for s in range(0, len(prompts), 16):
        img = images[s:s + 16].to(device)
        out.append(reward_fn.absolute(img, prompts[s:s + 16]).cpu())
        if srp is not None:
            srp_vals.append(reward_fn.relative(img, prompts[s:s + 16], pos, neg, 0.0).relative.float().cpu())
    metrics = {"reward": torch.cat(out).mean().item()}
    if srp_vals:
        metrics["srp_reward"] = torch.cat(srp_vals).mean().item()
    return metrics
