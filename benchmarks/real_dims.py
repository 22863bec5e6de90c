"""One SRPO update of FLUX.1-dev + HPSv2.1 at their real widths on the CPU, measured against
``srpo plan``'s prediction for exactly that configuration.

    OMP_NUM_THREADS=1 python benchmarks/real_dims.py --out runs/real_dims.json      # ~20 min, < 14 GiB
    python benchmarks/real_dims.py --tiny --out /tmp/real_dims.json                 # the same path, seconds
    OMP_NUM_THREADS=1 python benchmarks/real_dims.py --family qwen_image --procs 1,2 --modes lora \
        --size 256 --blocks 1 --updates 1 --out runs/real_dims_qwen_image_lora.json

``--family`` (flux, flux2, qwen_image, sd3, z_image) builds that family's flagship at its real
widths (:func:`srpo.bench.real_dims.build_model`); ``--procs 1,2`` runs each mode once per process
count, N > 1 as N ranks of a gloo group (``parallel.strategy=fsdp``: the transformer and the
reward's image tower sharded), each rank measuring its own peak; a cell reports the largest
rank's peak and transformer bytes and is planned with ``estimate_for(cfg, sizes, N, "fsdp",
device="cpu")``. The JSON is written after each cell (``--replan`` plans it again).

Random weights of the real classes at the real widths (:mod:`srpo.bench.real_dims`: transformer
hidden 3072, 24 heads of 128, joint attention 4096, pooled 768, guidance embedding; FLUX.1-dev's
16-channel VAE; T5 at T5-XXL width with 2 layers and 512 tokens; CLIP-L; the HPSv2.1 reward at
ViT-H-14 width), fewer transformer blocks (1 double + 1 single by default). Each mode (LoRA r64,
full) runs in its own process, in the trainer's order (LoRA, ``memory.prepare``, every prompt
encoded then the text encoders released, optimizer) and the trainer's update
(``srpo.step.update``): a short rollout, SRPO's two branches through the VAE decoder and the
reward, clipping, AdamW. Dtypes as a user of this CPU would pick them (bf16 is 2x fp32 on AMX,
fp16 is slower than fp32): bf16 frozen parts and transformer autocast, the reward stored in bf16
under bf16 autocast, fp32 master weights.

Measured: the process's peak resident memory (VmHWM, reset through ``/proc/self/clear_refs``)
less its file-backed pages (RssFile: code paged in, file maps; not tensors), minus the same after
the imports, with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the
resident set (``--glibc-heap``: glibc's default), for each update (the second has AdamW's state
resident, as every later update; ``measured_gib`` is the largest); its parts: bytes of
parameters, gradients and optimizer state counted from the tensors, tensors autograd holds for
backward per component (saved-tensor hooks, checkpointed regions count their inputs) and the
peak of each phase of the update (transformer forward, VAE decode, reward, their backwards, the
optimizer step). Planned: :func:`srpo.planner.estimate_for` on the same config, the sizes of the
same modules (``model_sizes(cfg, parts)``) and ``device="cpu"``. Then the plan of the real
19 + 38 blocks at 720 x 720 on 1 and 8 GPUs, LoRA and full, text encoders resident and released.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing

from srpo.bench.measure import reset_peak, status_kb  # noqa: E402

GIB = 1024**3
MMAP_THRESHOLD = 65536  # the measuring processes' MALLOC_MMAP_THRESHOLD_ (see _child_env)


def anon(field: str = "VmRSS") -> int:
    """Bytes of ``field`` (VmRSS: resident now; VmHWM: its peak) less the file-backed pages
    resident now (RssFile: shared libraries' code paged in as kernels first run), which are not
    tensors. Within an update no file is unmapped, so the peak's file pages are at most today's;
    across a read of safetensors files (mapped, then unmapped) see :class:`Sampler`."""
    return (status_kb(field) - status_kb("RssFile")) * 1024


class Sampler:
    """The peak of anonymous resident memory over a stretch that maps and unmaps files (the
    transformer's read from safetensors: its pages are the file's, resident while it is mapped):
    RssAnon + RssShmem polled every millisecond, and VmHWM less the most file pages seen (also a
    lower bound of it, exact where the peak is brief); the larger of the two."""

    def __init__(self):
        import threading

        self.anon = self.file = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> None:
        with open("/proc/self/status") as f:
            kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                  if k in ("RssAnon", "RssShmem", "RssFile")}
        self.anon = max(self.anon, (kb["RssAnon"] + kb["RssShmem"]) * 1024)
        self.file = max(self.file, kb["RssFile"] * 1024)

    def _poll(self) -> None:
        while not self.stop.wait(0.001):
            self._read()

    def __enter__(self):
        self._read()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._read()

    def peak(self) -> int:
        return max(self.anon, status_kb("VmHWM") * 1024 - self.file)


# ---------------------------------------------------------------------- instruments

def _local(t):
    """This rank's part of a tensor (an FSDP2 DTensor's local shard; a plain tensor itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    """Bytes this process holds of ``tensors`` (FSDP2: its shards)."""
    return sum(_local(t).numel() * t.element_size() for t in tensors)


class Phases:
    """Peak resident memory of each phase of an update, phases told apart by module hooks:
    forward pre-hooks (outside backward: checkpoint recomputation is part of the backward) and
    full backward pre-hooks on the transformer, the VAE decoder and the reward's vision tower,
    and the optimizer's step pre-hook. Also the bytes autograd holds for backward per
    component (saved-tensor hooks, each storage once)."""

    def __init__(self, model, reward, optimizer):
        import torch

        self.torch = torch
        self.phase, self.peaks, self.handles = "start", {}, []
        self.saved, self.held, self.storages = {}, {}, {}  # live saved bytes per part, their peaks
        parts = {"transformer": model.transformer, "VAE decode": model.vae.decoder, "reward": reward.model.visual}
        # weights are not activations (autograd saves views of them: transposes, the reward's
        # projections); autocast's bf16 copies of fp32 weights are new storages and count
        self.weights = {_local(t).untyped_storage().data_ptr() for m in (model.transformer, model.vae, reward)
                        for t in (*m.parameters(), *m.buffers())}
        for name, m in parts.items():
            self.handles.append(m.register_forward_pre_hook(lambda *_, n=name: self._forward(n)))
            self.handles.append(m.register_full_backward_pre_hook(lambda *_, n=name: self.enter(f"{n} backward")))
        self.handles.append(optimizer.register_step_pre_hook(lambda *_: self.enter("clip done, optimizer step")))

    def _forward(self, name: str) -> None:
        torch = self.torch
        if torch._C._current_graph_task_id() != -1:  # recomputation inside backward
            return
        self.enter(f"{name} forward" if torch.is_grad_enabled() else f"{name} (no grad: rollout, text)")

    def enter(self, name: str) -> None:
        if name == self.phase:
            return
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), anon("VmHWM"))
        reset_peak(trim=False)
        self.phase = name

    def close(self) -> dict:
        self.enter("end")
        for h in self.handles:
            h.remove()
        return self.peaks

    # saved tensors, labelled by the forward phase that saved them
    def pack(self, t):
        label = self.phase.replace(" forward", "")
        key = t.untyped_storage().data_ptr()
        if self.torch._C._current_graph_task_id() != -1 or key in self.weights:
            return t
        if key in self.storages:
            self.storages[key][1] += 1
        else:
            self.storages[key] = [label, 1, t.untyped_storage().nbytes()]
            self.saved[label] = self.saved.get(label, 0) + self.storages[key][2]
            self.held[label] = max(self.held.get(label, 0), self.saved[label])
        return _Held(t, key, self)

    def unpack(self, h):
        return h.tensor if isinstance(h, _Held) else h

    def release(self, key) -> None:
        entry = self.storages[key]
        entry[1] -= 1
        if not entry[1]:
            del self.storages[key]
            self.saved[entry[0]] -= entry[2]


class _Held:
    def __init__(self, tensor, key, phases):
        self.tensor, self.key, self.phases = tensor, key, phases

    def __del__(self):
        self.phases.release(self.key)


# ---------------------------------------------------------------------- one mode (child process)

def _dims(family: str, tiny: bool, double: int, single: int):
    """What :mod:`srpo.bench.real_dims` builds: ``family`` at its real (or test) widths with
    ``double`` (+ ``single``) transformer blocks."""
    from dataclasses import replace

    from srpo.bench import real_dims as rd

    return replace(rd.TINY if tiny else rd.REAL, model=family).blocks(double, single)


def skeleton_start(model, folder: Path, ctx) -> None:
    """The trainer's start from a folder (:func:`srpo.parallel.skeleton_start`): the built
    transformer's random weights written as a diffusers folder (rank 0, whose turn comes first),
    then replaced by a skeleton of it (:func:`srpo.shards.skeleton`), so that ``setup.prepare``
    encodes the prompts first and only then reads the transformer, each rank its FSDP shards."""
    import gc

    from srpo.shards import skeleton

    tr = model.transformer
    if ctx.rank == 0:
        tr.save_pretrained(str(folder), safe_serialization=True)
    dtype = next(tr.parameters()).dtype
    model.transformer = skeleton(type(tr), folder, dtype)
    del tr
    gc.collect()


def measure(mode: str, args) -> dict:
    """Build, prepare and update in this process; memory relative to the resident set after
    the imports."""
    import torch

    from srpo import parallel, step as steps
    from srpo.bench import real_dims as rd

    import diffusers, open_clip, peft, transformers  # noqa: F401,E401 - imported before the baseline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    reset_peak()
    base = anon()
    dims = _dims(args.family, args.tiny, args.double, args.single)
    arch = rd.tiny_reward_arch(args.scratch) if args.tiny else dims.reward_arch
    cfg = rd.config(mode, args.size, args.rollout_steps, "cpu", rank=args.rank, tiny=args.tiny,
                    reward_dtype="bfloat16", reward_autocast="bf16", family=args.family, procs=args.procs[0])
    ctx = parallel.setup(cfg)
    t0 = time.perf_counter()
    model = None
    # one rank at a time builds the random model (the same seed: the same weights) and, from a
    # folder, keeps only a skeleton of its transformer, so that no two whole random models are
    # ever resident together (the trainer never builds one: it reads its shards)
    for turn in range(1 if args.whole_start else ctx.world):
        if args.whole_start or turn == ctx.rank:
            model = rd.build_model(dims, "cpu", torch.bfloat16 if mode == "lora" else torch.float32)
            if not args.whole_start:
                skeleton_start(model, Path(args.scratch) / f"transformer-{mode}", ctx)
        if not args.whole_start:
            parallel.barrier(ctx)
    reward = rd.build_reward(dims, "cpu", torch.bfloat16, arch=arch)
    reward_arch = rd.reward_arch_of(reward)
    text_params = sum(p.numel() for m in model.text_encoders() for p in m.parameters())
    text_bytes = _bytes(p for m in model.text_encoders() for p in m.parameters())
    build_s = time.perf_counter() - t0
    reset_peak()
    with Sampler() as start:  # the text encoders' visit (prepare and encode the prompts), the transformer's read
        run = rd.prepare_run(cfg, model, reward, ctx)
    start_peak = start.peak() - base
    tr = model.transformer
    transformer_bytes = _bytes(tr.parameters())  # this rank's: its FSDP shards (base and trainable)
    static = {
        "trainable parameters (fp32)": _bytes(run.params),
        "frozen transformer base": _bytes(p for p in tr.parameters() if not p.requires_grad),
        "VAE": _bytes(model.vae.parameters()),
        "reward model": _bytes(reward.parameters()),
        "text encoders (released)": _bytes(p for m in model.text_encoders() for p in m.parameters()),
    }
    updates = []
    for step in range(args.updates):
        reset_peak()
        before = anon() - base
        phases = Phases(model, reward, run.optimizer)
        t1 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(phases.pack, phases.unpack):
            row = steps.update(model, run.algorithm, run.optimizer, run.params, run.batches, cfg, ctx, step)
        seconds = time.perf_counter() - t1
        peaks = phases.close()
        peak = max(peaks.values()) - base
        updates.append({
            "update": step + 1, "seconds": seconds, "rollout_s": row["rollout_s"], "grad_s": row["grad_s"],
            "optimizer_s": row["optimizer_s"], "loss": row["loss"], "grad_norm": row["grad_norm"],
            "resident_before_gib": before / GIB, "peak_gib": peak / GIB,
            "phase_peaks_gib": {k: (v - base) / GIB for k, v in peaks.items() if k != "start"},
            "held_for_backward_gib": {k: v / GIB for k, v in phases.held.items()},
        })
        print(f"[{mode}] update {step + 1}: {seconds:.0f} s, peak {peak / GIB:.2f} GiB", file=sys.stderr, flush=True)
    state = [t for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    static["gradients"] = _bytes(p.grad for p in run.params if p.grad is not None)
    static["optimizer state"] = _bytes(state)
    measured = max(max(u["peak_gib"] for u in updates), start_peak / GIB)
    parallel.teardown(ctx)
    return {
        "mode": mode, "rank": ctx.rank, "procs": ctx.world, "family": args.family,
        "transformer_bytes": transformer_bytes,
        "config": {"blocks": [dims.double, dims.single], "size": args.size, "procs": args.procs[0],
                                 "rollout_steps": args.rollout_steps, "lora_rank": args.rank if mode == "lora" else None,
                                 "threads": torch.get_num_threads(),
                                 "start": "whole" if args.whole_start else "skeleton",
                                 "memory": "glibc heap, file pages counted" if args.glibc_heap else
                                 "anonymous, mmap threshold 64 KiB"},
        "transformer_params": sum(p.numel() for p in tr.parameters()), "trainable_params": sum(p.numel() for p in run.params),
        "text_encoder_params": text_params, "text_encoder_gib": text_bytes / GIB, "reward_params": reward_arch[0],
        "build_s": build_s, "prompts_encoded": run.encoded,
        "reward_arch": list(reward_arch), "measured_gib": measured,
        "start_peak_gib": start_peak / GIB, "static_gib": {k: v / GIB for k, v in static.items()},
        "updates": updates,
    }


def add_plan(r: dict, tiny: bool) -> None:
    """``srpo plan``'s figures for the measured configuration ``r`` (a :func:`measure` result):
    the config's estimate on the CPU for the same modules' sizes."""
    from srpo import plan as planner
    from srpo.bench import real_dims as rd

    c = r["config"]
    family, procs = r.get("family", rd.REAL.model), c.get("procs", 1)
    cfg = rd.config(r["mode"], c["size"], c["rollout_steps"], "cpu", rank=c["lora_rank"] or 64, tiny=tiny,
                    reward_dtype="bfloat16", reward_autocast="bf16", family=family, procs=procs)
    dims = _dims(family, tiny, *c["blocks"])
    arch = tuple(r["reward_arch"]) if r.get("reward_arch") else None  # none: the registry's HPS entry
    plan = planner.estimate_for(cfg, rd.plan_sizes(cfg, dims, arch), procs, "fsdp" if procs > 1 else "none",
                                device="cpu")
    r["planned_gib"] = plan["total"] / GIB
    r["plan_over_measured"] = r["planned_gib"] / r["measured_gib"]
    # the update alone (the start here holds the transformer built whole beside the text
    # encoders; the trainer's start from a folder reads it after them: srpo.parallel.skeleton_start)
    ranks = [x for x in r.get("ranks", []) if "update_peak_gib" in x] or [  # (older JSON: the cell's rank)
        {"update_peak_gib": max(u["peak_gib"] for u in r["updates"])}]
    r["update_peak_gib"] = max(x["update_peak_gib"] for x in ranks)
    r["planned_start_gib"] = plan.get("  peak while they are resident", 0) / GIB
    r["plan_parts_gib"] = {k: v / GIB for k, v in plan.items()}


# ---------------------------------------------------------------------- the real model's plan

def real_plan(size: int = 720) -> dict:
    """``srpo plan`` for all 19 + 38 blocks at ``size``: LoRA r64 (one GPU / DDP) and full
    (FSDP2), on 1 and 8 GPUs, with the text encoders resident and released after the start."""
    from srpo import plan as planner
    from srpo.bench import real_dims as rd

    out = {}
    for release in (False, True):
        for mode, strategy in (("lora", "none"), ("full", "fsdp")):
            cfg = rd.config(mode, size, 25, "cuda", release=release)
            sizes = planner.model_sizes(cfg)  # the family's own counting: FLUX.1-dev's 11.9 B transformer, T5-XXL + CLIP-L
            for gpus in (1, 8):
                strat = "ddp" if strategy == "none" and gpus > 1 else strategy
                parts = planner.estimate_for(cfg, sizes, gpus, strat)
                key = f"{mode} {strat} x{gpus}, text encoders {'released' if release else 'resident'}"
                out[key] = {"total_gib": parts["total"] / GIB,
                            "parts_gib": {k: v / GIB for k, v in parts.items() if v}}
    return out


# ---------------------------------------------------------------------- main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--tiny", action="store_true", help="the same code path at test size (seconds)")
    p.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; --tiny 32)")
    p.add_argument("--family", default="flux", help="flux (FLUX.1-dev), flux2 (FLUX.2 [dev]), qwen_image "
                                                     "(Qwen-Image), sd3 (SD3.5 Large), z_image (Z-Image-Turbo)")
    p.add_argument("--procs", default="1", help="comma list of process counts; N > 1: an N-process gloo "
                                                "FSDP2 group (parallel.strategy=fsdp), each rank measuring itself")
    p.add_argument("--blocks", type=int, default=None, help="transformer blocks (FLUX families: N double + "
                                                            "N single; default 1)")
    p.add_argument("--double", type=int, default=1, help="double-stream transformer blocks (FLUX families; default 1)")
    p.add_argument("--single", type=int, default=1, help="single-stream transformer blocks (FLUX families; default 1)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank)")
    p.add_argument("--rollout-steps", type=int, default=2, help="Euler steps of the rollout (default 2)")
    p.add_argument("--updates", type=int, default=2, help="updates per mode (the second has AdamW's state)")
    p.add_argument("--whole-start", action="store_true",
                   help="keep the built transformer whole until setup.prepare shards it (a start without a folder: it "
                        "is resident beside the text encoders); default: the trainer's start from a folder, the "
                        "transformer written to scratch and read as a skeleton after the prompts are encoded")
    p.add_argument("--glibc-heap", action="store_true",
                   help="leave glibc's heap as it is in the measuring processes (default: MALLOC_MMAP_THRESHOLD_="
                        f"{MMAP_THRESHOLD}, every block of 64 KiB or more its own mapping, given back when freed, so "
                        "the resident peak is the tensors live at once, not the heap glibc keeps after a phase)")
    p.add_argument("--replan", metavar="JSON", help="recompute the plan for the measurements in JSON (no new run)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 512)
    from srpo.bench import real_dims as rd

    if args.family not in rd.FAMILIES:
        p.error(f"unknown family {args.family}: use {', '.join(rd.FAMILIES)}")
    try:
        args.procs = [int(n) for n in str(args.procs).split(",") if n.strip()]
    except ValueError:
        p.error(f"--procs takes a comma list of process counts (got {args.procs})")
    if not args.procs or min(args.procs) < 1:
        p.error(f"--procs must be positive (got {args.procs})")
    if args.blocks is not None:
        args.double = args.single = args.blocks
    if args.family not in rd.DOUBLE_SINGLE:  # one stack of blocks
        args.double, args.single = args.blocks or args.double, 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("lora", "full")]
    if bad or not modes:
        p.error(f"unknown mode {bad[0] if bad else '(none)'}: use lora, full")
    for name in ("double", "single", "rank", "rollout_steps", "updates"):
        if getattr(args, name) < (0 if name in ("double", "single") else 1):
            p.error(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.double + args.single < 1:
        p.error("the transformer needs at least one block (--double, --single)")
    if args.size % 16:
        p.error(f"--size must be a multiple of 16 (got {args.size})")
    args.modes = modes
    return args


def markdown(result: dict) -> str:
    """BENCHMARKS.md's tables from a result: the modes, their parts, the real model's plans."""
    lines = ["| family | mode | procs | blocks | size | measured GiB | planned GiB | plan / measured | "
             "update peak GiB | plan / update peak | start measured / planned GiB | "
             "transformer GiB (largest rank) | s / update | peak phase |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["cells"].values():
        u = r["updates"][-1]
        phase = max(u["phase_peaks_gib"], key=u["phase_peaks_gib"].get)
        c = r["config"]
        lines.append(f"| {r.get('family', 'flux')} | {r['mode']} | {c.get('procs', 1)} | {c['blocks'][0]} + {c['blocks'][1]} "
                     f"| {c['size']} | {r['measured_gib']:.2f} | {r['planned_gib']:.2f} | {r['plan_over_measured']:.3f} "
                     f"| {r['update_peak_gib']:.2f} | {r['planned_gib'] / r['update_peak_gib']:.3f} "
                     f"| {max(x['start_peak_gib'] for x in r.get('ranks') or [r]):.2f} / {r['planned_start_gib']:.2f} "
                     f"| {r.get('transformer_bytes', 0) / GIB:.3f} | {u['seconds']:.0f} | {phase} |")
    for mode, r in result["modes"].items():
        u = r["updates"][-1]
        lines += ["", f"{mode}, measured (GiB; update {u['update']}, resident before it "
                      f"{u['resident_before_gib']:.2f}):", ""]
        lines += [f"- {k}: {v:.3f}" for k, v in r["static_gib"].items()]
        lines += [f"- held for backward, {k}: {v:.3f}" for k, v in u["held_for_backward_gib"].items()]
        lines += [f"- peak in phase {k}: {v:.2f}" for k, v in u["phase_peaks_gib"].items()]
        lines += ["", f"{mode}, planned (GiB):", ""] + [f"- {k}: {v:.3f}" for k, v in r["plan_parts_gib"].items()]
    if result.get("real_plan_720"):
        lines += ["", "| 19 + 38 blocks, 720 x 720 | per-GPU GiB |", "| --- | --- |"]
        lines += [f"| {k} | {v['total_gib']:.1f} |" for k, v in result["real_plan_720"].items()]
    return "\n".join(lines)


def _child_argv(args, mode: str, out: str, procs: int = 1) -> list[str]:
    argv = [sys.executable, __file__, "--child", mode, "--out", out, "--scratch", args.scratch,
            "--family", args.family, "--procs", str(procs),
            "--size", str(args.size), "--double", str(args.double), "--single", str(args.single),
            "--rank", str(args.rank), "--rollout-steps", str(args.rollout_steps), "--updates", str(args.updates)]
    return argv + (["--tiny"] if args.tiny else []) + (["--whole-start"] if args.whole_start else []) + (
        ["--glibc-heap"] if args.glibc_heap else [])


def _child_env(args, **extra) -> dict:
    """The measuring processes' environment: glibc's mmap threshold fixed at 64 KiB (unless
    ``--glibc-heap``): by default glibc raises it up to 32 MiB as large blocks are freed, after
    which activations of a few MiB come from a heap that keeps the pages a phase freed, and the
    resident peak of a later phase counts them again."""
    env = dict(os.environ, **extra)
    if not args.glibc_heap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(args, mode: str, out: str, procs: int) -> dict:
    """One mode on ``procs`` processes: one child (no process group), or ``procs`` ranks of a
    gloo group (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT``, as torchrun sets
    them; ``parallel.setup`` joins it). The result is the largest rank's: its peak
    (``measured_gib``) and its transformer bytes; ``ranks`` holds each rank's peak."""
    if procs == 1:
        subprocess.run(_child_argv(args, mode, out), check=True, env=_child_env(args))
        return json.loads(Path(out).read_text())
    env = _child_env(args, WORLD_SIZE=str(procs), LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port()))
    ranks = [subprocess.Popen(_child_argv(args, mode, out, procs), env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(procs)]
    codes = [r.wait() for r in ranks]
    if any(codes):
        raise subprocess.CalledProcessError(max(codes, key=abs), _child_argv(args, mode, out, procs))
    rows = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(procs)]
    cell = dict(max(rows, key=lambda r: r["measured_gib"]))
    cell["transformer_bytes"] = max(r["transformer_bytes"] for r in rows)
    cell["ranks"] = [{"rank": r["rank"], "measured_gib": r["measured_gib"], "start_peak_gib": r["start_peak_gib"],
                      "update_peak_gib": max(u["peak_gib"] for u in r["updates"]),
                      "transformer_bytes": r["transformer_bytes"]} for r in rows]
    return cell


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    if args.child:
        rank = os.environ.get("RANK")
        out = args.out if rank is None else f"{args.out}.rank{rank}"
        Path(out).write_text(json.dumps(measure(args.child, args)))
        return {}
    from srpo.bench import machine

    if args.replan:  # the plan again on measurements already made (the plan is a function of the config)
        result = json.loads(Path(args.replan).read_text())
    else:
        result = {"machine": machine(), "tiny": args.tiny, "family": args.family, "modes": {}, "cells": {}}
        with tempfile.TemporaryDirectory() as tmp:
            args.scratch = tmp
            for procs in args.procs:
                for mode in args.modes:  # each in fresh processes: their peaks are their own
                    out = str(Path(tmp) / f"{mode}-{procs}.json")
                    cell = run_cell(args, mode, out, procs)
                    result["cells"][f"{mode} x{procs}"] = cell
                    if procs == 1:
                        result["modes"][mode] = cell
                    if args.out:  # the measurements so far (``--replan`` plans them again)
                        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    cells = result.get("cells") or {f"{m} x1": r for m, r in result["modes"].items()}
    for r in cells.values():
        add_plan(r, result.get("tiny", False))
    result["cells"] = cells
    result["modes"] = {r["mode"]: r for r in cells.values() if r["config"].get("procs", 1) == 1}
    if result.get("family", "flux") == "flux":  # FLUX.1-dev's whole 19 + 38 blocks
        result["real_plan_720"] = real_plan()
    print(markdown(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
