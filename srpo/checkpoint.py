"""Resumable checkpoints, written atomically, that resume bit-exactly.

``DIR/checkpoints/step-NNNNNN/`` holds the trained parameters and the optimizer state in one of
two formats, then the same two small files:

- full (one process, DDP, or FSDP with ``parallel.sharded_checkpoints: false``):
  ``trainable.safetensors`` (the trained parameters, unsharded; LoRA: the adapters) and
  ``optimizer.pt`` (AdamW state keyed by parameter name, written by this project, read with
  ``weights_only=True``), gathered and written by rank 0;
- sharded (FSDP): ``sharded/``, a ``torch.distributed.checkpoint`` folder in which every rank
  writes its own shards of parameters and optimizer state (no rank holds the full state); it
  loads on any number of processes and any strategy, resharded on the way in;
- ``rng.json``: python / numpy / torch (and CUDA) RNG states of every rank,
- ``state.json``: the update count, the data position (samples consumed, global batch), the
  format and what the trainer adds (the guard's state).

A checkpoint is written into ``.tmp-step-NNNNNN``, synced and renamed into place by rank 0 only
after every rank finished its part, so a kill during a write leaves the previous checkpoint
intact; only the newest ``keep`` survive. Prompts, noise and timesteps are functions of (seed,
update, sample index), so the update count fixes the data position on any number of processes;
the RNG states (restored when the number of processes is the same) cover anything else.
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


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(d)


def _snapshot(obj):
    """``obj`` with every tensor cloned: what a background write reads does not change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


_WRITER = None


def _writer():
    """The one background thread that writes checkpoints (full format: the files; sharded: waits
    for DCP's write) and fsyncs them."""
    global _WRITER
    if _WRITER is None:
        from concurrent.futures import ThreadPoolExecutor

        _WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="srpo-checkpoint")
    return _WRITER


class _Pending:
    """A checkpoint whose shards are being written in the background: published (state files,
    fsync, rename, pruning) by :func:`wait` once every rank's write has finished."""

    def __init__(self, future, publish):
        self.future, self.publish = future, publish


_pending: _Pending | None = None


def wait(ctx: parallel.Context | None = None) -> None:
    """Finish the asynchronous checkpoint write in flight, if any, and publish it (collective:
    every rank calls it). :func:`save` calls it first, so one write is in flight at most."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        pending.future.result()  # this rank's shards are on disk (rank 0: the metadata too)
        parallel.barrier(ctx or parallel.Context())
        pending.publish()


def poll(ctx: parallel.Context | None = None) -> None:
    """Publish the write in flight if every rank's part has finished (collective: one small
    all-reduce while a write is in flight), so the newest checkpoint lags its write by one update
    at most, not by a checkpoint interval."""
    if _pending is not None:
        ctx = ctx or parallel.Context()
        if parallel.all_mean({"done": float(_pending.future.done())}, ctx)["done"] == 1.0:
            wait(ctx)


def abandon() -> None:
    """Forget a write left in flight by a run that raised (its ``.tmp-`` folder, never published,
    is removed by the next save into that run folder)."""
    global _pending
    _pending = None


def save(run_dir: str | Path, step: int, module: torch.nn.Module, optimizer, extra: dict | None = None,
         keep: int = 2, ctx: parallel.Context | None = None, sharded: bool = False,
         asynchronous: bool = False) -> Path | None:
    """Write checkpoint ``step``. Collective under DDP / FSDP: every rank calls it. ``sharded``
    (under FSDP): every rank writes its own shards; otherwise rank 0 gathers and writes the full
    state. ``asynchronous``: the state (each rank's shards, or rank 0's full state) is snapshot to
    CPU memory and written (and fsynced) in the background while training goes on; it is
    published by :func:`poll` once every rank's write finished, or by the next :func:`save` or
    :func:`wait` (until then the previous one is the newest). Returns the folder on rank 0."""
    ctx = ctx or parallel.Context()
    wait(ctx)  # the previous write first: one in flight at most, published in order
    sharded = sharded and ctx.distributed
    rngs = parallel.gather_objects(rng_state(), ctx)
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"{PREFIX}{step:06d}", root / f".tmp-{PREFIX}{step:06d}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):  # left by a kill during an earlier write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    if ctx.is_main:  # the small files first (their bytes are made durable with the rest)
        (tmp / "rng.json").write_text(json.dumps(rngs))
        fmt = "sharded" if sharded else "full"
        (tmp / "state.json").write_text(json.dumps({"step": step, "format": fmt, **(extra or {})}))
    shards = None
    if sharded:
        parallel.barrier(ctx)  # the folder exists (and no stale one) before any rank writes into it
        blind = [r for r, seen in enumerate(parallel.gather_objects(tmp.is_dir(), ctx)) if not seen]
        if blind:  # every rank raises alike (no rank left waiting in a collective)
            raise UserError(f"ranks {blind} do not see {root}: sharded checkpoints need a run folder every node "
                            f"shares; use a shared --output or set parallel.sharded_checkpoints=false")
        shards = parallel.save_sharded(module, optimizer, tmp / "sharded", ctx, asynchronous=asynchronous)
        params = optim = None
    else:
        params, optim = parallel.trainable_state(module, optimizer, ctx)
        if asynchronous:  # a snapshot now: training goes on in place while a thread writes
            params, optim = _snapshot(params), _snapshot(optim)

    def write() -> None:
        if shards is not None:
            shards.result()  # this rank's shards (rank 0: and the metadata) written by DCP's thread
        if ctx.is_main:
            if params is not None:
                save_file(params, str(tmp / "trainable.safetensors"))
                torch.save(optim, tmp / "optimizer.pt")
            _fsync_tree(tmp)  # make the bytes durable before the rename publishes them

    def publish() -> None:
        if ctx.is_main:
            if os.environ.get(KILL_IN_SAVE) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        parallel.barrier(ctx)

    if asynchronous:
        global _pending
        _pending = _Pending(_writer().submit(write), publish)
    else:
        write()
        publish()
    return final if ctx.is_main else None


LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError)


def _unreadable(path: Path, e: Exception) -> UserError:
    return UserError(f"checkpoint {path} cannot be loaded ({e.__class__.__name__}): delete it to resume "
                     f"from the one before")


def _mismatch(path: Path, saved: set, wanted: list) -> UserError | None:
    missing = [n for n in wanted if n not in saved]
    if not missing and len(saved) == len(wanted):
        return None
    example = missing[0] if missing else next(n for n in saved if n not in set(wanted))
    return UserError(f"checkpoint {path} does not match the model ({len(saved)} saved vs {len(wanted)} "
                     f"trainable tensors, e.g. {example}): resume with the config it was written with")


def _wanted(module: torch.nn.Module) -> list[str]:
    return [n for n, p in parallel.unwrap(module).named_parameters() if p.requires_grad]


def _read_small(path: Path) -> tuple[dict, list]:
    try:
        state = json.loads((path / "state.json").read_text())
        rngs = json.loads((path / "rng.json").read_text()) if (path / "rng.json").is_file() else []
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    return state, rngs


def _read_full(path: Path, module: torch.nn.Module) -> tuple[dict, dict]:
    try:
        params = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except LOAD_ERRORS as e:
        raise _unreadable(path, e) from None
    error = _mismatch(path, set(params), _wanted(module))
    if error:
        raise error
    return params, optim


def _fit_error(path: Path, e: Exception) -> UserError:
    return UserError(f"checkpoint {path} does not fit the model or optimizer ({e.__class__.__name__}: "
                     f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}): resume with the config it "
                     f"was written with")


def load(path: str | Path, module: torch.nn.Module, optimizer, ctx: parallel.Context | None = None) -> dict:
    """Restore parameters, optimizer state and this rank's RNG states; returns state.json.
    Collective under DDP / FSDP. Full format: rank 0 reads the files and broadcasts them (the
    other nodes need no copy). Sharded: every rank reads the pieces of its own shards, whatever
    the number of processes that wrote them."""
    ctx = ctx or parallel.Context()
    path = Path(path)
    small = _read_small(path) if ctx.is_main else None
    state, rngs = parallel.broadcast_object(small, ctx)
    if (path / "sharded").is_dir() or state.get("format") == "sharded":
        error = None
        try:
            error = _mismatch(path, parallel.sharded_keys(path / "sharded"), _wanted(module))
        except LOAD_ERRORS as e:
            error = _unreadable(path, e)
        if error:
            raise error
        try:
            parallel.load_sharded(module, optimizer, path / "sharded", ctx)
        except Exception as e:  # torch.distributed.checkpoint wraps every rank's failure in CheckpointException
            raise _fit_error(path, e) from None
    else:
        params, optim = _read_full(path, module) if ctx.is_main else ({}, {})
        try:
            parallel.load_trainable_state(module, optimizer, params, optim, ctx)
        except (KeyError, ValueError, RuntimeError) as e:
            raise _fit_error(path, e) from None
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
        print(f"--resume: continuing after update {state['step']} from {last}"
              + (f" ({state.get('world')} processes wrote it, {ctx.world} read it)" if state.get("world", ctx.world) != ctx.world else ""))
    return state
