"""Differentiable image preprocessing for reward models, as tensor ops.

Reproduces the eval transforms reward models were trained and evaluated with:

- open_clip: ``Resize(shortest side, bicubic)`` on a PIL image, ``CenterCrop``, ``ToTensor``,
  ``Normalize`` (or, HPSv2, longer side resized and zero-padded to a square);
- transformers ``CLIPImageProcessor``: shortest-side resize (torchvision's uint8 kernel on PIL
  input, or PIL itself with the ``Pil`` backend), centre crop, rescale by 1/255, normalise.

Resizing is an antialiased separable filter (PIL's: bicubic with ``a = -0.5`` or the triangle
filter, support scaled by the downscale factor), written as two small weight matrices so that
it runs on any device and dtype and is differentiable. Both references resize 8-bit images and
round after each pass, which moves normalised pixels by up to a few hundredths;
``uint8="pil"`` / ``uint8="torch"`` reproduces that fixed-point arithmetic (and the pass order)
exactly in the forward pass, straight-through: the gradient is the float filter's.
``uint8=None`` is the plain float filter (equal to ``F.interpolate(..., antialias=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}


def _filter(x: Tensor, interpolation: str) -> Tensor:
    """PIL's resampling filters (``a = -0.5`` cubic; triangle)."""
    x = x.abs()
    if interpolation == "bilinear":
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


@lru_cache(maxsize=64)
def resize_weights(n_in: int, n_out: int, interpolation: str = "bicubic") -> Tensor:
    """[n_out, n_in] float64 antialiased resampling matrix, as PIL and torch compute it."""
    if interpolation not in _SUPPORT:
        raise ValueError(f"interpolation must be one of {sorted(_SUPPORT)}, got {interpolation!r}")
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = _SUPPORT[interpolation] * fscale
    center = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    lo = torch.trunc(center - support + 0.5).clamp(min=0)[:, None]
    hi = torch.trunc(center + support + 0.5).clamp(max=n_in)[:, None]
    j = torch.arange(n_in, dtype=torch.float64)[None]
    w = _filter((j - center[:, None] + 0.5) * (1.0 / fscale), interpolation)
    w = torch.where((j >= lo) & (j < hi), w, torch.zeros_like(w))
    total = w.sum(1, keepdim=True)
    return torch.where(total != 0, w / total, w)


def _int_weights(w: Tensor, backend: str) -> tuple[Tensor, int]:
    """Fixed-point weights and their precision: PIL uses 22 bits; torch's uint8 kernel picks the
    largest precision (< 22) that keeps every weight inside int16."""
    if backend == "pil":
        bits = 22
    elif backend == "torch":
        w_max = float(w.max())
        bits = 0
        while bits < 22 and int(0.5 + w_max * (1 << (bits + 1))) < (1 << 15):
            bits += 1
    else:
        raise ValueError(f"uint8 emulation must be 'pil' or 'torch', got {backend!r}")
    scaled = w * (1 << bits)
    return torch.trunc(scaled + torch.where(w < 0, -0.5, 0.5)), bits


def _fixed_point(x: Tensor, w: Tensor, backend: str, dim: int) -> Tensor:
    """One 8-bit resampling pass along ``dim`` (-1 or -2) of integer-valued float64 ``x``."""
    wi, bits = _int_weights(w, backend)
    wi = wi.to(x.device)
    acc = x @ wi.T if dim == -1 else wi @ x
    return torch.floor((acc + (1 << (bits - 1))) / (1 << bits)).clamp(0, 255)


def _emulate_uint8(q: Tensor, size: tuple[int, int], interpolation: str, backend: str,
                   vertical_first: bool = False) -> Tensor:
    """The 8-bit two-pass resize of integer-valued ``q`` [..., H, W] (float64)."""
    passes = [(-1, q.shape[-1], size[1]), (-2, q.shape[-2], size[0])]
    for dim, n_in, n_out in passes[::-1] if vertical_first else passes:
        if n_in != n_out:
            q = _fixed_point(q, resize_weights(n_in, n_out, interpolation), backend, dim)
    return q


@lru_cache(maxsize=256)
def _pil_vertical_first(h_in: int, w_in: int, h: int, w: int, interpolation: str) -> bool:
    """Whether the installed Pillow runs the vertical pass first for this size pair.

    Pillow >= 13 may (a speed heuristic that differs between versions), and the order changes
    the 8-bit rounding. Asked once per size pair, on a noise image where orders disagree.
    """
    import numpy as np
    from PIL import Image

    if h == h_in or w == w_in:
        return False
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (h_in, w_in, 3), generator=g, dtype=torch.uint8)
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    ref = np.asarray(Image.fromarray(noise.numpy()).resize((w, h), resample))
    ref = torch.from_numpy(ref.copy()).permute(2, 0, 1).double()
    horizontal_first = _emulate_uint8(noise.permute(2, 0, 1).double(), (h, w), interpolation, "pil")
    return not torch.equal(horizontal_first, ref)


def resize(images: Tensor, size: tuple[int, int], interpolation: str = "bicubic",
           uint8: str | None = None) -> Tensor:
    """Antialiased resize of [B, C, H, W] to ``size = (h, w)``.

    ``uint8`` = "pil" / "torch": the forward value is that of the 8-bit reference (input rounded
    to 1/255, rounding after each pass, in the reference's pass order), the gradient that of the
    float filter.
    """
    h_in, w_in = images.shape[-2:]
    h, w = size
    out = images
    if w != w_in:
        out = out @ resize_weights(w_in, w, interpolation).to(out).T
    if h != h_in:
        out = resize_weights(h_in, h, interpolation).to(out) @ out
    if uint8 is None:
        return out
    vertical_first = uint8 == "pil" and _pil_vertical_first(h_in, w_in, h, w, interpolation)
    with torch.autocast(images.device.type, enabled=False):
        q = torch.round(images.detach().double().clamp(0, 1) * 255)
        q = _emulate_uint8(q, size, interpolation, uint8, vertical_first)
        q = (q / 255).to(out.dtype)
    return out + (q - out).detach()


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side scaled to ``size`` and the longer one truncated, as
    torchvision's ``Resize(int)`` and transformers' ``shortest_edge`` compute it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the longer side scaled to ``size``, both rounded (open_clip's 'longest' mode,
    HPSv2's ``ResizeMaxSize``)."""
    ratio = max(height, width) / size
    return round(height / ratio), round(width / ratio)


def center_crop(images: Tensor, size: tuple[int, int], rounding: str = "floor") -> Tensor:
    """Centre crop to ``size = (h, w)``, zero-padding first where the image is smaller (as
    torchvision and transformers do). Crop offsets: floor((H - h) / 2) (transformers) or
    Python-rounded (torchvision)."""
    H, W = images.shape[-2:]
    h, w = size
    if h > H or w > W:
        pad_w, pad_h = max(w - W, 0), max(h - H, 0)
        images = torch.nn.functional.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        H, W = images.shape[-2:]
    off = (lambda d: int(round(d / 2.0))) if rounding == "round" else (lambda d: int(d / 2.0))
    top, left = off(H - h), off(W - w)
    return images[..., top: top + h, left: left + w]


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shortest side; longest side, then pad; or squash), centre crop, normalise:
    images in [0, 1] -> model input."""

    size: int | tuple[int, int]  # shortest / longest side length, or (h, w) for "squash"
    crop: tuple[int, int]  # (h, w) of the centre crop (zero padding where the image is smaller)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # "shortest" | "longest" (then pad) | "squash"
    crop_rounding: str = "floor"  # "floor" (transformers) | "round" (torchvision)
    uint8: str | None = None  # None | "pil" | "torch": emulate the 8-bit reference resize

    def __post_init__(self):
        allowed = {"uint8": (None, "pil", "torch"), "resize_mode": ("shortest", "longest", "squash"),
                   "interpolation": tuple(_SUPPORT), "crop_rounding": ("floor", "round")}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise UserError(f"image transform {name}={getattr(self, name)!r}: use one of {values}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_mode == "squash":
            s = self.size
            return (s, s) if isinstance(s, int) else tuple(s)
        if self.resize_mode == "longest":
            return longest_side_size(height, width, int(self.size))
        return shortest_side_size(height, width, int(self.size))

    def __call__(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, crop_h, crop_w] normalised (differentiable)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        x = resize(images, self.output_size(*images.shape[-2:]), self.interpolation, self.uint8)
        x = center_crop(x, self.crop, self.crop_rounding)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[:, None, None]
        return (x - mean) / std

    @classmethod
    def from_clip_processor(cls, processor, uint8: str | None = "auto") -> "ImageTransform":
        """From a transformers ``CLIPImageProcessor`` (or a ``CLIPProcessor`` holding one).

        ``uint8="auto"`` emulates the processor's own 8-bit resize on PIL input: torchvision's
        kernel for the default backend, PIL's for the ``Pil`` backend.
        """
        p = getattr(processor, "image_processor", processor)
        size, crop = dict(p.size), dict(p.crop_size)
        if "shortest_edge" in size and size.get("shortest_edge"):
            size_arg, mode = int(size["shortest_edge"]), "shortest"
        elif size.get("height") and size.get("width"):
            size_arg, mode = (int(size["height"]), int(size["width"])), "squash"
        else:
            raise UserError(f"unsupported image processor size {size}: expected shortest_edge or height/width")
        resample = int(getattr(p, "resample", 3))
        interpolation = {2: "bilinear", 3: "bicubic"}.get(resample)
        if interpolation is None:
            raise UserError(f"unsupported image processor resample={resample}: expected bicubic (3) or bilinear (2)")
        if uint8 == "auto":
            uint8 = "pil" if getattr(p, "backend", "torchvision") == "pil" else "torch"
        crop_hw = (int(crop["height"]), int(crop["width"])) if p.do_center_crop else None
        if crop_hw is None:
            crop_hw = size_arg if isinstance(size_arg, tuple) else (size_arg, size_arg)
        return cls(size_arg, crop_hw, tuple(p.image_mean), tuple(p.image_std), interpolation,
                   mode, "floor", uint8)

    @classmethod
    def from_open_clip(cls, preprocess_cfg: dict, uint8: str | None = "pil") -> "ImageTransform":
        """From an open_clip model's ``visual.preprocess_cfg`` (its eval transform, on PIL input).
        'longest' resizes the longer side and zero-pads to a square, as HPSv2 scores images."""
        uint8 = "pil" if uint8 == "auto" else uint8  # open_clip's transform runs on PIL images
        size = preprocess_cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        mode = preprocess_cfg.get("resize_mode", "shortest") or "shortest"
        if mode not in ("shortest", "longest", "squash"):
            raise UserError(f"open_clip resize_mode '{mode}' is not supported: use shortest, longest or squash")
        if mode != "squash" and size[0] != size[1]:
            raise UserError(f"open_clip non-square input size {size} is supported only with resize_mode 'squash'")
        interpolation = preprocess_cfg.get("interpolation") or "bicubic"
        interpolation = "bilinear" if interpolation == "bilinear" else "bicubic"
        mean = preprocess_cfg.get("mean") or OPENAI_CLIP_MEAN
        std = preprocess_cfg.get("std") or OPENAI_CLIP_STD
        mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
        std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
        size_arg = size if mode == "squash" else size[0]
        return cls(size_arg, size, mean, std, interpolation, mode, "round", uint8)
