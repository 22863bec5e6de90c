"""Gradient reductions per update: ``parallel.grad_sync: update`` (one, in the last backward)
against ``backward`` (one per backward pass), under DDP and FSDP2, LoRA and full, counted in the
trainer's own update (:func:`srpo.step.update`) on the tiny FLUX config with gloo.

    torchrun --standalone --nproc_per_node 2 benchmarks/grad_sync.py --out sync.json

Per (strategy, mode, grad_sync): the gradient collectives of one update (counted with
torch.profiler inside the backward passes: DDP's bucket all-reduces, FSDP2's reduce-scatters;
the metric means and the gradient norm's reduction come after them), the backward passes of that
update, its seconds, and the trained weights after ``--updates`` updates (``--weights DIR``:
one safetensors file per run, written by rank 0) so the two modes can be compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing

ROOT = Path(__file__).resolve().parents[1]
GRADIENT_OPS = ("c10d::allreduce_", "c10d::_reduce_scatter_base_", "c10d::reduce_scatter_")


def _count(fn):
    """Run ``fn``; return (the collectives issued inside backward passes, by op name; the backward calls)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    calls = [0]
    backward = torch.autograd.backward

    def counted_backward(*a, **k):
        calls[0] += 1
        with record_function("grad_sync.backward"):
            return backward(*a, **k)

    torch.autograd.backward = counted_backward
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.autograd.backward = backward
    events = prof.events()
    passes = [e.time_range for e in events if e.name == "grad_sync.backward"]
    ops: dict[str, int] = {}
    for e in events:
        if e.name in GRADIENT_OPS and any(r.start <= e.time_range.start <= r.end for r in passes):
            ops[e.name] = ops.get(e.name, 0) + 1
    return ops, calls[0]


def run(ctx, strategy: str, lora: bool, sync: str, updates: int, grad_accum: int, weights: Path | None) -> dict:
    from srpo import parallel, setup, step as steps
    from srpo.config import load_config
    from srpo.data import load_prompts

    sets = ["train.batch_size=1", f"train.grad_accum={grad_accum}", "rollout.steps=4", f"parallel.strategy={strategy}",
            f"parallel.grad_sync={sync}", f"lora.enabled={str(lora).lower()}", "lora.rank=4",
            "memory.release_text_encoders=false"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    ctx = dataclasses.replace(ctx, strategy=strategy)
    prompts = load_prompts(cfg.data.prompts)
    model, _, algorithm = setup.build(cfg, ctx.device)
    params, optimizer, _ = setup.prepare(model, cfg, ctx, prompts)
    batches = steps.Batches(cfg, model, algorithm, prompts, ctx)
    rows = []
    for u in range(updates):
        seconds = time.perf_counter()
        ops, backward = _count(
            lambda: rows.append(steps.update(model, algorithm, optimizer, params, batches, cfg, ctx, u)))
        seconds = time.perf_counter() - seconds
    gradient = sum(ops.values())  # what the last update's backward passes reduced
    state, _ = parallel.trainable_state(model.transformer, optimizer, ctx)
    name = f"{strategy}-{'lora' if lora else 'full'}-{sync}"
    if weights is not None and ctx.is_main:
        from safetensors.torch import save_file

        weights.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights / f"{name}.safetensors"))
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(m, FSDPModule) for m in model.transformer.modules())  # FSDP2's parameter groups
    return {"run": name, "strategy": strategy, "mode": "lora" if lora else "full", "grad_sync": sync,
            "resolved": parallel.grad_sync_mode(sync, strategy, lora), "backward_passes": backward,
            "gradient_reductions": gradient, "ops": ops, "fsdp_units": units, "seconds": seconds,
            "loss": rows[-1]["loss"], "grad_norm": rows[-1]["grad_norm"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="ddp,fsdp")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--updates", type=int, default=2, help="updates per run (the last is counted)")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--weights", type=Path, help="write each run's trained weights here (rank 0)")
    p.add_argument("--out", type=Path, help="JSON file (rank 0)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from srpo import parallel
    from srpo.config import load_config

    ctx = parallel.setup(load_config(ROOT / "configs" / "tiny.yaml", ["parallel.strategy=ddp"]))
    results = [run(ctx, strategy, mode == "lora", sync, a.updates, a.grad_accum, a.weights)
               for strategy in a.strategies.split(",") for mode in a.modes.split(",")
               for sync in ("backward", "update")]
    if ctx.is_main:
        for r in results:
            print(f"{r['run']:>22}: {r['gradient_reductions']:3d} gradient reductions over {r['backward_passes']} "
                  f"backward passes, {r['seconds']:.2f} s")
        if a.out:
            a.out.write_text(json.dumps({"world": ctx.world, "grad_accum": a.grad_accum, "runs": results}, indent=1))
    parallel.teardown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
