"""Resumable checkpoints, written atomically.

``DIR/checkpoints/step-NNNNNN/`` holds ``trainable.safetensors`` (the trained parameters),
``optimizer.pt`` (AdamW state; created by this project, read with ``weights_only=True``) and
``state.json`` (the update count). A checkpoint is written to a temporary folder and renamed
into place, so a kill during a write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

PREFIX = "step-"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())


def latest(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save(run_dir: str | Path, step: int, module: torch.nn.Module, optimizer, extra: dict | None = None, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path, module: torch.nn.Module, optimizer) -> dict:
    path = Path(path)
    try:
        state = load_file(str(path / "trainable.safetensors"))
        missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise UserError(f"checkpoint {path} does not match the model ({len(missing)} trainable tensors missing, e.g. {missing[0]}): resume with the config it was written with")
        params = dict(module.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} cannot be loaded ({e.__class__.__name__}): delete it to resume from the one before") from None
