"""Image statistics that reward hacking moves, and their drift from a base model's images.

Pure tensor functions of ``[B, 3, H, W]`` images in [0, 1]. Drift of a statistic is
``|mean(now) - mean(base)| / std(base)`` over images of the same prompts and seeds (the base
model's per-image spread is the unit), and the hack index is the largest drift: one definition
for the guard and the lab's judge (which reads it over the three statistics it was built around).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

STATS = ("saturation", "contrast", "sharpness", "brightness", "colourfulness", "high_frequency")
LAB_STATS = ("saturation", "contrast", "sharpness")  # the lab judge's hack index


def luminance(images: Tensor) -> Tensor:
    """Rec. 601 luma ``[B, H, W]``."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * w).sum(1)


def _laplacian(lum: Tensor) -> Tensor:
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=lum.dtype,
                       device=lum.device).view(1, 1, 3, 3)
    return F.conv2d(lum[:, None], lap)


def image_stats(images: Tensor, keys=STATS) -> dict[str, Tensor]:
    """Per-image statistics ``[B]`` of images in [0, 1]:

    - ``saturation``: mean HSV saturation ``(max - min) / max`` over pixels;
    - ``contrast``: standard deviation of luminance;
    - ``sharpness``: mean absolute Laplacian of luminance;
    - ``brightness``: mean luminance;
    - ``colourfulness``: Hasler & Suesstrunk's ``sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2)``
      with ``rg = R - G``, ``yb = (R + G) / 2 - B``;
    - ``high_frequency``: the fraction of the luminance's (mean-removed) spectral energy above half
      the Nyquist frequency (radially, in cycles per pixel).
    """
    images = images.float()
    out: dict[str, Tensor] = {}
    lum = luminance(images)
    if "saturation" in keys:
        mx, mn = images.max(1).values, images.min(1).values
        out["saturation"] = ((mx - mn) / mx.clamp(min=1e-3)).mean((1, 2))
    if "contrast" in keys:
        out["contrast"] = lum.flatten(1).std(1)
    if "sharpness" in keys:
        out["sharpness"] = _laplacian(lum).abs().mean((1, 2, 3))
    if "brightness" in keys:
        out["brightness"] = lum.mean((1, 2))
    if "colourfulness" in keys:
        r, g, b = images[:, 0], images[:, 1], images[:, 2]
        rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
        out["colourfulness"] = (rg.std(1) ** 2 + yb.std(1) ** 2).sqrt() + 0.3 * (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
    if "high_frequency" in keys:
        h, w = lum.shape[-2:]
        spec = torch.fft.fft2(lum - lum.mean((1, 2), keepdim=True)).abs() ** 2
        fy = torch.fft.fftfreq(h, device=lum.device)[:, None]
        fx = torch.fft.fftfreq(w, device=lum.device)[None, :]
        high = ((fy**2 + fx**2).sqrt() > 0.25).to(spec.dtype)  # half of Nyquist (0.5 cycles / pixel)
        total = spec.flatten(1).sum(1).clamp(min=1e-12)
        out["high_frequency"] = (spec * high).flatten(1).sum(1) / total
    return {k: out[k] for k in keys}


def drift(now: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, float]:
    """``|mean(now) - mean(base)| / std(base)`` per statistic (std over the base images)."""
    return {k: float((now[k].mean() - base[k].mean()).abs() / base[k].std().clamp(min=1e-8)) for k in now if k in base}


def hack_index(now: dict[str, Tensor], base: dict[str, Tensor], keys=None) -> float:
    """The largest drift over ``keys`` (all statistics present by default); NaN when any is NaN
    (never a silently smaller index)."""
    return max_drift(drift(now, base), keys)


def max_drift(d: dict[str, float], keys=None) -> float:
    values = [d[k] for k in (keys or d)]
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def diversity(features: Tensor, groups: int) -> float:
    """Mean pairwise distance of unit features within each of ``groups`` equal consecutive groups
    (the seeds of one prompt), averaged over the groups: 0 when every seed gives the same image."""
    f = F.normalize(features.float(), dim=-1).reshape(groups, -1, features.shape[-1])
    n = f.shape[1]
    if n < 2:
        return float("nan")
    d = torch.cdist(f, f)  # [groups, n, n]
    return float(d.sum((1, 2)).mean() / (n * (n - 1)))
