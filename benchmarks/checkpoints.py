"""Sharded vs gathered checkpoints under FSDP2: each rank's extra memory and the seconds to write
and read one, on CPU with gloo.

    OMP_NUM_THREADS=1 python benchmarks/checkpoints.py --procs 2 --out ckpt.json
    OMP_NUM_THREADS=1 python benchmarks/checkpoints.py --procs 4 --hidden 1024

A FLUX transformer (diffusers' ``FluxTransformer2DModel``, 24 heads of 128 at the default width
3072 would be FLUX.1-dev's; the default here is narrower to fit beside its AdamW state on this
machine) is sharded with the project's ``parallel.apply`` (FSDP2 per block, then the root), its
AdamW state filled with random numbers, then ``srpo.checkpoint.save`` writes it in both formats
(``sharded``: torch.distributed.checkpoint, every rank its own shards; ``full``: rank 0 gathers
the parameters and optimizer state and writes them) and ``srpo.checkpoint.load`` reads it back
into the same layout. Memory is each process's peak resident set during the call minus the
resident set before (``srpo.bench.measure.peak_memory``); the loaded state must equal the saved
one exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing

MiB = 2**20


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _snapshot(module, optimizer) -> list[torch.Tensor]:
    tensors = [_local(p.detach()) for p in module.parameters()]
    tensors += [_local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return [t.clone() for t in tensors]


def _scramble(module, optimizer) -> None:
    with torch.no_grad():
        for t in [p for p in module.parameters()] + [v for s in optimizer.state.values() for v in s.values()
                                                     if torch.is_tensor(v) and v.dim()]:
            _local(t).normal_()


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    from srpo import checkpoint, parallel
    from srpo.bench.measure import peak_memory
    from srpo.config import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    heads = args.hidden // 128
    tr = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
                                num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768,
                                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    n_params = sum(p.numel() for p in tr.parameters())
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", ["parallel.strategy=fsdp"])
    ctx = parallel.Context(rank, world, torch.device("cpu"), "fsdp", owns_group=True)
    holder = SimpleNamespace(transformer=tr)
    parallel.apply(holder, cfg, ctx)
    optimizer = torch.optim.AdamW(tr.parameters(), lr=1e-4)
    _init_optim_state(optimizer)
    _scramble(tr, optimizer)
    results = {}
    for fmt in ("sharded", "full"):
        folder = Path(args.scratch) / fmt
        expect = _snapshot(tr, optimizer)
        parallel.barrier(ctx)
        t0 = time.perf_counter()
        save_mib = peak_memory(lambda: checkpoint.save(folder, 1, tr, optimizer, ctx=ctx, sharded=fmt == "sharded"))
        parallel.barrier(ctx)
        save_s = time.perf_counter() - t0
        _scramble(tr, optimizer)
        parallel.barrier(ctx)
        t0 = time.perf_counter()
        load_mib = peak_memory(lambda: checkpoint.load(checkpoint.latest(folder), tr, optimizer, ctx))
        parallel.barrier(ctx)
        load_s = time.perf_counter() - t0
        got = _snapshot(tr, optimizer)
        exact = len(got) == len(expect) and all(torch.equal(a, b) for a, b in zip(got, expect))
        files = sorted(p for p in checkpoint.latest(folder).rglob("*") if p.is_file()) if rank == 0 else []
        results[fmt] = {"save_s": save_s, "load_s": load_s, "save_extra_mib": save_mib, "load_extra_mib": load_mib,
                        "exact": exact, "files": {str(p.relative_to(folder)): p.stat().st_size for p in files}}
    every = parallel.gather_objects(results, ctx)
    if rank == 0:
        state_mib = n_params * 12 / MiB  # fp32 weights + AdamW's two moments
        report = {"procs": world, "parameters": n_params, "hidden": args.hidden, "double": args.double,
                  "single": args.single, "full_state_mib": state_mib, "ranks": every}
        Path(out).write_text(json.dumps(report, indent=2))
    parallel.teardown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, default=2, help="processes (gloo ranks)")
    p.add_argument("--hidden", type=int, default=1536, help="transformer width, a multiple of 128 (FLUX.1-dev: 3072)")
    p.add_argument("--double", type=int, default=2, help="double-stream blocks")
    p.add_argument("--single", type=int, default=4, help="single-stream blocks")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.hidden % 128 or args.hidden < 128 or args.procs < 1:
        print("checkpoints.py: --hidden must be a positive multiple of 128 and --procs at least 1", file=sys.stderr)
        raise SystemExit(2)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="srpo-ckpt-") as scratch:
        args.scratch = scratch
        out = os.path.join(scratch, "result.json")
        mp.spawn(_worker, args=(args.procs, _free_port(), args, out), nprocs=args.procs, join=True)
        report = json.loads(Path(out).read_text())
    print(f"{report['parameters'] / 1e6:.0f}M parameters, {args.procs} processes; weights + AdamW state "
          f"{report['full_state_mib']:.0f} MiB in all")
    print(f"{'format':>8} {'rank':>4} {'save s':>7} {'load s':>7} {'save +MiB':>10} {'load +MiB':>10} exact")
    for fmt in ("sharded", "full"):
        for rank, r in enumerate(report["ranks"]):
            x = r[fmt]
            print(f"{fmt:>8} {rank:>4} {x['save_s']:7.2f} {x['load_s']:7.2f} {x['save_extra_mib']:10.0f} "
                  f"{x['load_extra_mib']:10.0f} {x['exact']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
