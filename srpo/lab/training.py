"""Shared pieces of the lab trainers (:mod:`srpo.lab.build` runs them): stage sizes and seeds,
the deterministic setup, the renderer pool, the learning-rate schedule and float16 rounding."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from .render import render, sample_scenes

THREADS = 1  # single-threaded: the same weights on any machine with the same CPU kind

# stage sizes: (full, quick)
STEPS = {"vae": (1000, 8), "judge": (1500, 8), "base": (6000, 8), "reward": (1500, 8)}
POOL = {"vae": (24000, 256), "judge": (24000, 256), "base": (60000, 256), "reward": (40000, 256)}
SEEDS = {"vae": 11, "judge": 23, "base": 37, "reward": 51}


def _setup(seed: int) -> torch.Generator:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def render_pool(n: int, seed: int, progress: bool = True, **pins):
    """``n`` scenes from ``seed`` and their images as uint8 ``[n, 3, 32, 32]``."""
    scenes = sample_scenes(n, seed, **pins)
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    chunk = 1000
    for i in tqdm(range(0, n, chunk), desc=f"render {n}", disable=not progress, leave=False):
        images[i:i + chunk] = (render(scenes[i:i + chunk]) * 255).round().to(torch.uint8)
    return scenes, images


def to_float(images_u8):
    return images_u8.float() / 255


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr

def round_fp16(module):
    """Round every floating parameter / buffer to float16 precision in place (kept float32), so
    the in-memory model equals what the float16 files load back as."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return module


def store_fp16(folder) -> None:
    """Rewrite every safetensors file under ``folder`` in float16 (the configs keep float32:
    diffusers and transformers load them back as float32)."""
    from safetensors.torch import load_file, save_file

    for f in Path(folder).rglob("*.safetensors"):
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(f)).items()}
        save_file(state, str(f), metadata={"format": "pt"})
