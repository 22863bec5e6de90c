"""Resumable checkpoints, written atomically, that resume bit-exactly.

``DIR/checkpoints/step-NNNNNN/`` holds

- ``trainable.safetensors``: the trained parameters (full, unsharded; LoRA: the adapters),
- ``optimizer.pt``: AdamW state keyed by parameter name (written by this project, read with
  ``weights_only=True``),
- ``rng.json``: python / numpy / torch (and CUDA) RNG states of every rank,
- ``state.json``: the update count and the data position (samples consumed, global batch).

A checkpoint is written to ``.tmp-step-NNNNNN`` on rank 0, synced and renamed into place, so a
kill during a write leaves the previous checkpoint intact; only the newest ``keep`` survive.
Prompts, noise and timesteps are functions of (seed, update, sample index), so the update
count fixes the data position; the RNG states cover anything else drawing random numbers.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import parallel
from .errors import UserError

PREFIX = "step-"
KILL_IN_SAVE = "SRPO_TEST_KILL_IN_SAVE"  # test hook: SIGKILL this process mid-write of that step


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())


def latest(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = parallel.unwrap(module)
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """This process's RNG states as JSON-able lists."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------- save / load

def data_position(cfg, ctx, step: int) -> dict:
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * ctx.world
    return {"samples_seen": step * global_batch, "global_batch": global_batch, "world": ctx.world}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir: str | Path, step: int, module: torch.nn.Module, optimizer, extra: dict | None = None,
         keep: int = 2, ctx: parallel.Context | None = None) -> Path | None:
    """Write checkpoint ``step``. Collective under DDP / FSDP (every rank calls it; rank 0
    writes). Returns the folder on rank 0."""
    ctx = ctx or parallel.Context()
    params, optim = parallel.trainable_state(module, optimizer, ctx)
    rngs = parallel.gather_objects(rng_state(), ctx)
    final = None
    if ctx.is_main:
        root = Path(run_dir) / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a kill during an earlier write
            shutil.rmtree(stale, ignore_errors=True)
        final = root / f"{PREFIX}{step:06d}"
        tmp = root / f".tmp-{PREFIX}{step:06d}"
        tmp.mkdir()
        save_file(params, str(tmp / "trainable.safetensors"))
        if os.environ.get(KILL_IN_SAVE) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save(optim, tmp / "optimizer.pt")
        (tmp / "rng.json").write_text(json.dumps(rngs))
        (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier(ctx)
    return final


def _read(path: Path, module: torch.nn.Module) -> tuple[dict, dict, dict, list]:
    try:
        params = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        state = json.loads((path / "state.json").read_text())
        rngs = json.loads((path / "rng.json").read_text()) if (path / "rng.json").is_file() else []
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        raise UserError(f"checkpoint {path} cannot be loaded ({e.__class__.__name__}): delete it to resume "
                        f"from the one before") from None
    wanted = [n for n, p in parallel.unwrap(module).named_parameters() if p.requires_grad]
    missing = [n for n in wanted if n not in params]
    if missing or len(params) != len(wanted):
        example = missing[0] if missing else next(n for n in params if n not in set(wanted))
        raise UserError(f"checkpoint {path} does not match the model ({len(params)} saved vs {len(wanted)} "
                        f"trainable tensors, e.g. {example}): resume with the config it was written with")
    return params, optim, state, rngs


def load(path: str | Path, module: torch.nn.Module, optimizer, ctx: parallel.Context | None = None) -> dict:
    """Restore parameters, optimizer state and this rank's RNG states; returns state.json.
    Collective under DDP / FSDP: rank 0 reads the files and broadcasts them."""
    ctx = ctx or parallel.Context()
    path = Path(path)
    if ctx.is_main:
        params, optim, state, rngs = _read(path, module)
    else:
        params, optim, state, rngs = {}, {}, None, None
    state, rngs = parallel.broadcast_object((state, rngs), ctx)
    try:
        parallel.load_trainable_state(module, optimizer, params, optim, ctx)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} does not fit the model or optimizer ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:120]}): resume with the config it was written with") from None
    if len(rngs) == ctx.world:
        set_rng_state(rngs[ctx.rank])
    return state


def resume(run_dir: str | Path, module: torch.nn.Module, optimizer, cfg, ctx: parallel.Context) -> dict:
    """Load the newest checkpoint of ``run_dir`` (if any) and return its ``state.json`` (``step``:
    its update count; 0 without a checkpoint; plus what the trainer stored, e.g. the guard's state)."""
    last = latest(run_dir) if ctx.is_main else None
    last = parallel.broadcast_object(None if last is None else str(last), ctx)
    if last is None:
        if ctx.is_main:
            print(f"--resume: no checkpoint in {Path(run_dir) / 'checkpoints'}; starting from update 0")
        return {"step": 0}
    state = load(last, module, optimizer, ctx)
    want = data_position(cfg, ctx, state["step"])["global_batch"]
    if state.get("global_batch", want) != want:
        raise UserError(f"checkpoint {last} was written with a global batch of {state['global_batch']} samples, "
                        f"this launch has {want}: resume with the same batch_size x grad_accum x processes")
    if ctx.is_main:
        print(f"--resume: continuing after update {state['step']} from {last}")
    return state
