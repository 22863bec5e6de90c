"""Per-sample randomness: every random choice of a run is a function of (seed, update, global
sample index, named stream) only, never of how samples are laid out over ranks, micro-steps or
resumes. This is the one module that turns those keys into generators and noise.

Streams are named; their numbers are part of the run's reproducibility contract (changing one
changes every run that uses it), so they are fixed here and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch

STREAMS = {
    "timestep": 1,        # SRPO's ts, ReFL's step, GRPO's trained steps
    "rollout_noise": 2,   # the online rollout's noise (the Direct-Align prior)
    "words": 3,           # control words when srp.word_order is random
    "sde": 4,             # GRPO's SDE step noise
    "offline_noise": 5,   # offline mode: fresh noise for real-image latents
    "offline_order": 6,   # offline mode: which image a sample gets
    "eval_noise": 7,      # held-out evaluation and sample grids
    "lora_init": 8,       # a LoRA adapter's initial A (its index: crc32 of the parameter's name)
    "grpo_group": 100,    # GRPO: member m of a group draws stream 100 + m
}


def stream_id(stream: str, member: int = 0) -> int:
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream '{stream}': one of {', '.join(STREAMS)}")
    return STREAMS[stream] + member


def rng(seed: int, step: int, index: int, stream: str, member: int = 0) -> np.random.Generator:
    """The numpy generator of one (seed, update, sample, stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, step, index, stream_id(stream, member)]))


def torch_seed(seed: int, step: int, index: int, stream: str, member: int = 0) -> int:
    """A torch seed for one (seed, update, sample, stream)."""
    return int(rng(seed, step, index, stream, member).integers(0, 2**62))


def generator(seed: int, step: int, index: int, stream: str, member: int = 0) -> torch.Generator:
    """A CPU torch generator (CPU so a seed reproduces on every device)."""
    return torch.Generator().manual_seed(torch_seed(seed, step, index, stream, member))


def noise(shape, seed: int, step: int, indices, stream: str, device=None, member: int = 0) -> torch.Tensor:
    """Standard normal ``[len(indices), *shape[1:]]``: sample ``i`` of the batch drawn from the
    key ``(seed, step, indices[i], stream)`` alone. ``shape`` is the shape of one sample with a
    leading batch dimension of 1 (as ``model.latent_shape(1, h, w)`` gives it)."""
    out = torch.cat([torch.randn(tuple(shape), generator=generator(seed, step, int(i), stream, member))
                     for i in indices])
    return out if device is None else out.to(device)


def prompt_order(seed: int, n: int) -> np.ndarray:
    """The run's order of its ``n`` training prompts (one permutation per run)."""
    return np.random.default_rng(seed).permutation(n)


def offline_order(seed: int, n: int) -> np.ndarray:
    """The run's order of its ``n`` offline images."""
    return np.random.default_rng(np.random.SeedSequence([seed, STREAMS["offline_order"]])).permutation(n)
