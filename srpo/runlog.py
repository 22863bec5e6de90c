"""The run folder: metrics.jsonl, TensorBoard events, image grids and curves. Only the process
that owns the folder (rank 0) writes; the others get a logger that does nothing."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, labels=None) -> Path:
    """[N, 3, H, W] in [0, 1] -> one PNG grid."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    pad = 2
    canvas = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(canvas).save(path)
    return path


def to_pil(image: torch.Tensor) -> Image.Image:
    arr = (image.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def plot_curves(rows: list[dict], keys: list[str], path: str | Path, title: str = "") -> Path | None:
    """Line plots of metrics over updates, one panel per key present in ``rows``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(key)
        ax.set_xlabel("update")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


class RunLog:
    def __init__(self, folder: str | Path, enabled: bool = True, tensorboard: bool = True, resume: bool = False):
        self.folder = Path(folder)
        self.enabled = enabled
        self.rows: list[dict] = []
        self._tb = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.folder / "metrics.jsonl"
        if resume and self.metrics_path.exists():
            self.rows = [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tensorboard"))

    def truncate(self, step: int) -> None:
        """On resume: drop rows written after the checkpoint being resumed from."""
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r["step"] < step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.scalars(row["step"], row)

    def scalars(self, step: int, values: dict) -> None:
        """Numeric values to TensorBoard only (e.g. the guard's evaluation before training)."""
        if self._tb is not None:
            for k, v in values.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            tmp = self.folder / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.folder / name)

    def grid(self, images, name: str) -> None:
        if self.enabled:
            save_grid(images, self.folder / "samples" / name)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
