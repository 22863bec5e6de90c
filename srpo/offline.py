"""Offline mode: x0 from real images instead of rollouts (SRPO.md, "Where x0 comes from").

A folder of images with captions: a same-name ``.txt`` next to each image, a ``metadata.jsonl``
in the folder (``{"file_name": ..., "text": ...}`` per line, the Hugging Face image-folder
convention), or a captions file with one line per image in sorted file-name order. Each image
is resized to cover the training size, centre-cropped (diffusers' ``VaeImageProcessor``) and
VAE-encoded once (latents cached on the CPU); the noise is fresh per sample and, like every
per-sample choice, depends only on (seed, update, global sample index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import seeding
from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str


def _captions_from_file(path: Path, images: list[Path]) -> list[str]:
    if not path.is_file():
        raise UserError(f"data.offline.captions file not found: {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) != len(images):
        raise UserError(f"captions file {path} has {len(lines)} captions for {len(images)} images: "
                        f"give one line per image, in sorted file-name order")
    return lines


def _captions_from_jsonl(path: Path, images: list[Path]) -> list[str]:
    table = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            table[row["file_name"]] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} line {n}: expected {{\"file_name\": ..., \"text\": ...}}") from None
    missing = [p.name for p in images if p.name not in table]
    if missing:
        raise UserError(f"{path} has no caption for {missing[0]} ({len(missing)} images without one)")
    return [table[p.name] for p in images]


def scan(folder: str | Path, captions: str | Path | None = None) -> list[Item]:
    """The captioned images of ``folder`` in sorted file-name order; one-line errors otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data.offline.images folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if captions is not None:
        texts = _captions_from_file(Path(captions), images)
    elif (folder / "metadata.jsonl").is_file():
        texts = _captions_from_jsonl(folder / "metadata.jsonl", images)
    else:
        missing = [p for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise UserError(f"image {missing[0]} has no caption file {missing[0].with_suffix('.txt').name} "
                            f"({len(missing)} without): add .txt captions, a metadata.jsonl or data.offline.captions")
        texts = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    empty = [p.name for p, t in zip(images, texts) if not t]
    if empty:
        raise UserError(f"image {empty[0]} has an empty caption")
    return [Item(p, t) for p, t in zip(images, texts)]


def load_pixels(path: Path, height: int, width: int) -> torch.Tensor:
    """``[3, height, width]`` in [0, 1]: resized to cover the size, centre-cropped."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError):
        raise UserError(f"cannot read image {path}: remove it or replace it with a PNG/JPEG") from None
    proc = VaeImageProcessor(vae_scale_factor=1, do_normalize=False, do_resize=True, resample="lanczos")
    return proc.preprocess(image, height=height, width=width, resize_mode="crop")[0].float()


class OfflineData:
    """Captioned images -> (prompts, x0 latents, noise) for the samples of one micro-step."""

    def __init__(self, cfg, seed: int, height: int, width: int):
        self.items = scan(cfg.images, cfg.captions)
        self.switch = cfg.switch_to_online_after
        self.seed, self.height, self.width = seed, height, width
        self.order = seeding.offline_order(seed, len(self.items))
        self._latents: dict[Path, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> "OfflineData | None":
        off = cfg.data.offline
        return None if off is None else cls(off, cfg.train.seed, cfg.rollout.height, cfg.rollout.width)

    @property
    def captions(self) -> list[str]:
        return [it.caption for it in self.items]

    def active(self, step: int) -> bool:
        """Offline for updates before ``switch_to_online_after`` (always when it is unset)."""
        return self.switch is None or step < self.switch

    def items_for(self, step: int, indices: list[int], global_batch: int) -> list[Item]:
        n = len(self.items)
        return [self.items[self.order[(step * global_batch + i) % n]] for i in indices]

    def latents(self, model, item: Item) -> torch.Tensor:
        """VAE latents of one image (``[1, C, h, w]``), encoded once and cached on the CPU."""
        if item.path not in self._latents:
            pixels = load_pixels(item.path, self.height, self.width)[None].to(model.device)
            self._latents[item.path] = model.encode(pixels).float().cpu()
        return self._latents[item.path]

    def noise(self, model, step: int, indices: list[int]) -> torch.Tensor:
        return seeding.noise(model.latent_shape(1, self.height, self.width), self.seed, step, indices,
                             "offline_noise", device=model.device)

    @torch.no_grad()
    def batch(self, model, step: int, indices: list[int], global_batch: int):
        """(captions, x0 ``[B, C, h, w]``, fresh noise ``[B, C, h, w]``) on the model's device."""
        items = self.items_for(step, indices, global_batch)
        x0 = torch.cat([self.latents(model, it) for it in items]).to(model.device)
        return [it.caption for it in items], x0, self.noise(model, step, indices)
