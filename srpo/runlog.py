"""The run folder: metrics.jsonl, TensorBoard events, image grids and curves, and optionally a
Weights & Biases run (``log.wandb``). Only the process that owns the folder (rank 0) writes; the
others get a logger that does nothing."""

from __future__ import annotations

import base64
import json
import math
import os
import re
from pathlib import Path

import torch
from PIL import Image

from .errors import UserError

WANDB_ID_FILE = "wandb_run_id"  # RUN/wandb_run_id: the W&B run a --resume continues


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, labels=None) -> Path:
    """[N, 3, H, W] in [0, 1] -> one PNG grid; videos [N, F, 3, H, W]: a row of frames each."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.ndim == 5:
        nrow, images = images.shape[1], images.flatten(0, 1)
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


def import_wandb():
    """``import wandb``, or the one-line UserError that says how to install it."""
    try:
        import wandb
    except ImportError:
        raise UserError("log.wandb is set but wandb is not installed: pip install 'srpo[wandb]'") from None
    return wandb


def _numeric(values: dict) -> dict:
    """The finite numbers of a metrics row, without its step (what TensorBoard and W&B plot)."""
    return {k: v for k, v in values.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


def _inline_images(page: str, folder: Path) -> str:
    """report.html links its grids beside it (samples/...); W&B shows the page alone, so the
    images it links go inside it as data URIs."""
    def repl(m):
        path = folder / m[1]
        if not path.is_file():
            return m[0]
        return f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
    return re.sub(r'src="([^":]+\.png)"', repl, page)


def _rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a last line torn by a kill mid-write is dropped (truncate rewrites
    the file), a damaged line elsewhere is an error."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path} line {i + 1} is not JSON: repair or delete the line, then resume") from None
    return rows


class RunLog:
    def __init__(self, folder: str | Path, enabled: bool = True, tensorboard: bool = True, resume: bool = False,
                 wandb=None, config: dict | None = None):
        """``wandb``: the ``log.wandb`` section (or None); ``config``: the resolved config as a dict
        (the W&B run's config)."""
        self.folder = Path(folder)
        self.enabled = enabled
        self.rows: list[dict] = []
        self._tb = None
        self._wb = None  # the W&B run (rank 0, log.wandb set)
        self._wb_lib = None
        self._wb_from = 0  # W&B drops steps below the run's own: a resumed online run starts after its last
        self._wb_pending: dict = {}  # sample grids whose update is not known yet: go with the next row
        self._step = 0  # the newest update logged
        if wandb is not None:  # on every rank, before any file is written: a missing wandb fails alike everywhere
            self._wb_lib = import_wandb()
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if wandb is not None:
            self._wb = self._start_wandb(wandb, config, resume)
        self.metrics_path = self.folder / "metrics.jsonl"
        if resume and self.metrics_path.exists():
            self.rows = _rows(self.metrics_path)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tensorboard"))

    def _start_wandb(self, wcfg, config: dict | None, resume: bool):
        """Start the W&B run; on resume continue the run whose id RUN/wandb_run_id holds."""
        wandb = self._wb_lib
        id_file = self.folder / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
        again = {"id": run_id, "resume": "allow"} if run_id else {}
        wdir = Path(wcfg.dir) if wcfg.dir else self.folder
        wdir.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(project=wcfg.project, entity=wcfg.entity, mode=wcfg.mode,
                             name=wcfg.name or self.folder.resolve().name, dir=str(wdir), tags=list(wcfg.tags),
                             config=config, **again)
        except Exception as e:  # not logged in, no network, bad entity: wandb's own message, on one line
            msg = " ".join(str(e).split()) or type(e).__name__
            raise UserError(f"log.wandb: W&B could not start the run: {msg} "
                            f"(run `wandb login`, or set log.wandb.mode=offline)") from None
        if wcfg.mode != "disabled":
            id_file.write_text(run.id + "\n")
        self._wb_from = int(getattr(run, "starting_step", 0) or 0) if resume else 0
        return run

    def _wb_log(self, values: dict, step: int) -> None:
        if self._wb is None or step < self._wb_from:
            return
        if self._wb_pending:
            values = {**self._wb_pending, **values}
            self._wb_pending = {}
        if values:
            self._wb.log(values, step=step)

    def truncate(self, step: int) -> None:
        """On resume: drop rows written after the checkpoint being resumed from."""
        if not self.enabled:
            return
        self.rows = [r for r in self.rows if r["step"] < step]
        self._step = max((int(r["step"]) for r in self.rows), default=0)
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._step = max(self._step, int(row["step"]))
        self.scalars(row["step"], row)

    def scalars(self, step: int, values: dict) -> None:
        """Numeric values to TensorBoard and W&B, not to metrics.jsonl (e.g. the guard's
        evaluation before training)."""
        if not self.enabled:
            return
        values = _numeric(values)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        self._wb_log(values, int(step))

    def write_json(self, name: str, data: dict) -> None:
        if self.enabled:
            tmp = self.folder / (name + ".tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.folder / name)

    def grid(self, images, name: str) -> None:
        """RUN/samples/<name>; with W&B also an image under samples/<stem>, at the update the name
        says (before: 0, step-N: N), else (after) with the next row or at the end."""
        if not self.enabled:
            return
        path = save_grid(images, self.folder / "samples" / name)
        if self._wb is None:
            return
        stem = Path(name).stem
        image = self._wb_lib.Image(str(path), caption=stem)
        m = re.fullmatch(r"step-(\d+)", stem)
        step = 0 if stem == "before" else int(m[1]) if m else None
        if step is None:
            self._wb_pending[f"samples/{stem}"] = image
        else:
            self._wb_log({f"samples/{stem}": image}, step)

    def close(self) -> None:
        """Close TensorBoard; finish the W&B run after adding curves.png and report.html if the run
        folder has them."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wb is not None:
            extra = {}
            if (self.folder / "curves.png").is_file():
                extra["curves"] = self._wb_lib.Image(str(self.folder / "curves.png"), caption="curves")
            if (self.folder / "report.html").is_file():
                page = _inline_images((self.folder / "report.html").read_text(encoding="utf-8"), self.folder)
                extra["report"] = self._wb_lib.Html(page, inject=False, data_is_not_path=True)
            self._wb_log(extra, max(self._step, self._wb_from))
            self._wb.finish()
            self._wb = None
