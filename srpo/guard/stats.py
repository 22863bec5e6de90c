"""Image statistics that reward hacking moves, and their drift from a base model's images.

Pure tensor functions of ``[B, 3, H, W]`` images in [0, 1] (and of ``[B, F, 3, H, W]`` videos:
:func:`video_stats`, the image statistics averaged over each video's frames plus the temporal
statistics :data:`TEMPORAL_STATS`). Drift of a statistic is ``|mean(now) - mean(base)| /
std(base)`` over images (videos) of the same prompts and seeds (the base model's per-image spread
is the unit), and the hack index is the largest drift: one definition for the guard and the lab's
judge (which reads it over the three statistics it was built around).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

STATS = ("saturation", "contrast", "sharpness", "brightness", "colourfulness", "high_frequency")
LAB_STATS = ("saturation", "contrast", "sharpness")  # the lab judge's hack index
TEMPORAL_STATS = ("frame_difference", "flicker", "motion")  # videos only
VIDEO_STATS = STATS + TEMPORAL_STATS


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


def temporal_stats(videos: Tensor, keys=TEMPORAL_STATS) -> dict[str, Tensor]:
    """Per-video temporal statistics ``[B]`` of videos ``[B, F, 3, H, W]`` in [0, 1], on the
    luminance ``L_t`` of frame ``t`` (all 0 for a video of one frame: nothing changes):

    - ``frame_difference``: mean ``|L_{t+1} - L_t|`` over pixels and consecutive frame pairs;
    - ``flicker``: the fraction of the luminance's temporal spectral energy (each pixel's series
      over the frames, its mean removed) above half the temporal Nyquist frequency (0.25 cycles
      per frame): frame-to-frame alternation, not smooth change (0 for a static video, 1 for
      frames alternating between two images at an even frame count);
    - ``motion``: the gradient-weighted normal-flow speed in pixels per frame,
      ``sum |L_{t+1} - L_t| |grad L| / sum |grad L|^2`` over the interior pixels of every pair
      (``grad``: central differences of the pair's mean frame); a pattern translated by ``d``
      pixels per frame along its gradient moves ``d`` (exactly for a linear ramp); a change of
      brightness on a flat frame is no motion (0).
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"temporal statistics need videos [B, F, 3, H, W], got {list(videos.shape)}")
    videos = videos.float()
    b, f, _, h, w = videos.shape
    lum = luminance(videos.flatten(0, 1)).view(b, f, h, w)
    out: dict[str, Tensor] = {}
    if f < 2:
        return {k: torch.zeros(b, device=videos.device) for k in keys}
    diff = lum[:, 1:] - lum[:, :-1]  # [B, F - 1, H, W]
    if "frame_difference" in keys:
        out["frame_difference"] = diff.abs().mean((1, 2, 3))
    if "flicker" in keys:
        spec = torch.fft.fft(lum - lum.mean(1, keepdim=True), dim=1).abs() ** 2  # [B, F, H, W]
        high = (torch.fft.fftfreq(f, device=lum.device).abs() > 0.25).to(spec.dtype).view(1, f, 1, 1)
        total = spec.flatten(1).sum(1).clamp(min=1e-12)
        out["flicker"] = (spec * high).flatten(1).sum(1) / total
    if "motion" in keys:
        mid = 0.5 * (lum[:, 1:] + lum[:, :-1])
        gx = 0.5 * (mid[..., 1:-1, 2:] - mid[..., 1:-1, :-2])
        gy = 0.5 * (mid[..., 2:, 1:-1] - mid[..., :-2, 1:-1])
        g = (gx**2 + gy**2).sqrt()
        it = diff[..., 1:-1, 1:-1].abs()
        out["motion"] = (it * g).flatten(1).sum(1) / (g**2).flatten(1).sum(1).clamp(min=1e-12)
    return {k: out[k] for k in keys}


def video_stats(videos: Tensor, keys=VIDEO_STATS) -> dict[str, Tensor]:
    """Per-video statistics ``[B]`` of videos ``[B, F, 3, H, W]`` in [0, 1]: each of
    :data:`STATS` in ``keys`` is the mean over the video's frames of :func:`image_stats`, each of
    :data:`TEMPORAL_STATS` is :func:`temporal_stats`."""
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"video statistics need videos [B, F, 3, H, W], got {list(videos.shape)}")
    b, f = videos.shape[:2]
    per_frame = image_stats(videos.flatten(0, 1), [k for k in keys if k in STATS])
    out = {k: v.view(b, f).mean(1) for k, v in per_frame.items()}
    out.update(temporal_stats(videos, [k for k in keys if k in TEMPORAL_STATS]))
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
