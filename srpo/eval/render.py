"""The images of ``srpo eval``: the guard's renderer (:func:`srpo.evaluate.generate` with the
guard's noise keys), so image ``i`` is prompt ``i // seeds`` at seed ``i % seeds`` and seed 0 of a
prompt is its evaluation noise; kept as 8-bit (what the PNGs hold, and what is scored)."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def image_prompts(prompts: list[str], seeds: int) -> tuple[list[str], list[int]]:
    """The prompt and the noise key of every image (the guard's :meth:`Guard.images` keys)."""
    n = len(prompts)
    return [p for p in prompts for _ in range(seeds)], [s * n + p for p in range(n) for s in range(seeds)]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8, rounded as the PNGs are written (:func:`srpo.runlog.to_pil`)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> [0, 1] floats, as ``srpo score`` reads a PNG."""
    return images.float() / 255


def render(model, prompts: list[str], seeds: int, seed: int, steps: int, guidance: float, height: int, width: int,
           batch: int = 8, desc: str = "render", progress: bool = True) -> torch.Tensor:
    """uint8 images (videos ``[N, F, 3, H, W]``) of every prompt x seed, one batch at a time."""
    from tqdm import tqdm

    from ..evaluate import generate

    every, keys = image_prompts(prompts, seeds)
    out = []
    with tqdm(total=len(every), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for s in range(0, len(every), batch):
            chunk = generate(model, every[s:s + batch], seed, steps, guidance, height, width, batch=batch,
                             keys=keys[s:s + batch])
            out.append(to_uint8(chunk))
            bar.update(len(chunk))
    return torch.cat(out)


def image_name(p: int, s: int) -> str:
    return f"p{p:04d}-s{s:02d}.png"


def video_name(p: int, s: int) -> str:
    return f"p{p:04d}-s{s:02d}.gif"


def save_videos(videos: torch.Tensor, folder: Path, seeds: int, fps: int | None = None) -> list[str]:
    """Videos ``[N, F, 3, H, W]`` (uint8): an animated GIF per video (each fitted to 256 pixels,
    :func:`srpo.video.write_preview_gif`) and ``grid.gif`` (the videos tiled as ``grid.png``
    tiles their first frames, played together); the per-video names."""
    from ..video import FPS, write_preview_gif

    fps = fps or FPS
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, v in enumerate(videos):
        name = video_name(i // seeds, i % seeds)
        write_preview_gif(as_float(v[None]), folder / name, fps=fps, nrow=1, pad=0)
        names.append(name)
    cols = seeds * math.ceil(math.sqrt(len(videos)) / seeds)
    write_preview_gif(as_float(videos), folder / "grid.gif", fps=fps, nrow=cols)
    return names


def save(images: torch.Tensor, folder: Path, seeds: int) -> list[str]:
    """One PNG per image (a video: its first frame) and ``grid.png`` (near square, each prompt's seeds
    adjacent in prompt order); the names."""
    from ..runlog import save_grid, to_pil

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = image_name(i // seeds, i % seeds)
        to_pil(as_float(img if img.ndim == 3 else img[0])).save(folder / name)
        names.append(name)
    first = images if images.ndim == 4 else images[:, 0]
    cols = seeds * math.ceil(math.sqrt(len(first)) / seeds)  # near square, a prompt's seeds side by side
    save_grid(as_float(first), folder / "grid.png", nrow=cols)
    return names
