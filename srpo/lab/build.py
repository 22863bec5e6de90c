"""``srpo lab build``: train every model of the lab world from seeds and write its weights.

Stages, each deterministic (fixed seeds, fixed thread count, deterministic algorithms):

1. ``vae``: a small AutoencoderKL (32x32 pixels -> 4x16x16 latents) trained on renderer images;
2. ``judge``: the independent CNN judge (style + content), on renderer images and their VAE
   reconstructions, with colour / contrast / blur augmentation;
3. ``base``: the FLUX transformer + CLIP and T5 text encoders, trained jointly with the
   rectified-flow loss on VAE latents of renderer images and their captions;
4. ``reward``: a transformers CLIPModel, contrastive on renderer images and captions (style
   words included) plus synthetic preference pairs in which the more saturated / contrasty copy
   of an image wins for every caption: the reward's documented, text-independent bias.

Each stage writes under ``weights/``: ``base/`` (a FluxPipeline folder with the VAE), ``reward/``
(a CLIPModel folder) and ``judge/``. Each stage's trainer lives in ``train_<stage>.py``; their
shared pieces (sizes, seeds, setup, float16 rounding) in :mod:`srpo.lab.training`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .train_base import save_base, train_base
from .train_judge import train_judge
from .train_reward import save_reward, train_reward
from .train_vae import load_vae, save_vae, train_vae
from .training import POOL, SEEDS, STEPS, THREADS

WEIGHTS = Path(__file__).parent / "weights"
STAGES = ("vae", "judge", "base", "reward")


def build(out=WEIGHTS, stages=STAGES, quick: bool = False, progress: bool = True) -> dict:
    """Run the given stages in order, writing under ``out``; returns seconds per stage."""
    from .prompts import write_prompt_sets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info_file = out / "build.json"
    info: dict = {}
    threads = torch.get_num_threads()
    try:
        for stage in stages:
            t0 = time.perf_counter()
            if stage == "vae":
                shutil.rmtree(out / "base", ignore_errors=True)
                save_vae(train_vae(quick, progress), out)
            elif stage == "judge":
                train_judge(load_vae(out), quick, progress).save(out / "judge")
            elif stage == "base":
                save_base(train_base(load_vae(out), quick, progress), out)
            elif stage == "reward":
                save_reward(*train_reward(quick, progress), out)
            else:
                raise ValueError(f"unknown stage {stage}: use {', '.join(STAGES)}")
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            info[stage] = {"seconds": round(time.perf_counter() - t0, 1), "steps": STEPS[stage][int(quick)],
                           "pool": POOL[stage][int(quick)], "seed": SEEDS[stage], "threads": THREADS}
            info_file.write_text(json.dumps(info, indent=1))
        if out.resolve() == WEIGHTS.resolve():
            write_prompt_sets()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return info
