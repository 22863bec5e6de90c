"""One SRPO update of a family (FLUX.1-dev by default) + HPSv2.1 at their real sizes on one GPU
or under torchrun on N: seconds per update, the gradient step's model FLOPs utilisation, peak
memory (the largest rank's) against ``srpo plan``.

    python benchmarks/gpu_update.py                     # GPU: 19 + 38 blocks, 720x720, LoRA r64, bf16 (minutes: not yet run)
    python benchmarks/gpu_update.py --tiny              # CPU dry run of the same code path, seconds
    python benchmarks/gpu_update.py --modes lora,full --steps 3 --out bench.json
    python benchmarks/gpu_update.py --compile none,blocks   # eager and compiled (train.compile), one run each
    python benchmarks/gpu_update.py --family flux2 --double 8 --single 48 --quantize int8   # FLUX.2 [dev] LoRA
    torchrun --nproc-per-node 8 benchmarks/gpu_update.py --family qwen_image --modes full   # FSDP2 over 8 GPUs

``--family`` builds flux, flux2, qwen_image, sd3 or z_image at its flagship's widths (the builds
of ``benchmarks/real_dims.py``, :mod:`srpo.models.real_dims`), by default at the flagship's depth
(``--double`` / ``--single`` set it: FLUX families' double- and single-stream blocks, the others'
blocks in ``--double``). Under torchrun (``WORLD_SIZE`` > 1) the run is FSDP2 over the ranks
(``parallel.strategy: fsdp``, the reward's image tower sharded too) and the plan is for that many
GPUs; rank 0 prints and writes the results.

The components are :mod:`srpo.bench.real_dims`' (the builder ``benchmarks/real_dims.py``
measures on the CPU): random weights of the real classes at FLUX.1-dev's sizes (19 double + 38
single blocks, width 3072, 24 heads; the 16-channel VAE; T5 at T5-XXL width with 2 layers and
CLIP-L, which encode the prompt once and are released, as the trainer does; the HPSv2.1 reward,
open_clip ViT-H-14, fp32 under fp16 autocast as the reference scores). The trainer's order
(LoRA, ``memory.prepare``, prompts encoded then the encoders released, optimizer) and its update
(``srpo.step.update``: a 25-step rollout, SRPO's two branches, clipping, the optimizer step).
Modes:

- ``lora`` (default): rank-64 adapters on a bf16 base, AdamW.
- ``full``: every transformer weight trained in fp32. AdamW's 95 GB of state does not fit
  beside 95 GB of fp32 weights and gradients on one 141 GB GPU, so this mode steps with SGD by
  default (``--full-optimizer adamw`` where it fits); the plan drops AdamW's state to match.

MFU counts the transformer's model FLOPs of the gradient step (both branches, forward and
backward, no recompute; frozen LoRA bases get no weight gradients) over the measured time of
the gradient step (VAE decode and reward included) at the GPU's dense bf16 peak, per GPU. FLUX.1:
the exact per-layer formula below (:func:`transformer_flops`); other families: one forward
counted by torch's FlopCounterMode (math attention, so attention's matmuls count) times 3 for a
full fine-tune (weight and input gradients) or 2 for LoRA (input gradients) plus the adapters'
weight gradients. The plan is :func:`srpo.plan.estimate_for` for exactly this
build (``model_sizes(cfg, parts)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


# ---------------------------------------------------------------------- FLOPs

def _tokens_of(name: str, image: int, text: int) -> int:
    """Tokens a FLUX Linear layer sees per sample (1 for modulation / embedding MLPs)."""
    if name.startswith("single_transformer_blocks."):
        return 1 if ".norm.linear" in name else image + text
    if name.startswith("transformer_blocks."):
        if "norm1.linear" in name or "norm1_context.linear" in name:
            return 1
        txt = any(k in name for k in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context"))
        return text if txt else image
    if name.startswith("context_embedder"):
        return text
    if name.startswith(("x_embedder", "proj_out")):
        return image
    return 1  # time / guidance / pooled-text embedders, norm_out modulation


# Linear layers whose input never needs a gradient (it comes from the data, not the model)
FIRST_LAYERS = ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.guidance_embedder.linear_1", "time_text_embed.text_embedder.linear_1")


FIRST_PROJECTIONS = tuple(f"transformer_blocks.0.attn.{k}" for k in (
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))


def _conditioning(name: str) -> bool:
    return name.startswith(("time_text_embed.", "norm_out.")) or ".norm1.linear" in name or (
        ".norm1_context.linear" in name or ".norm.linear" in name)


def transformer_flops(transformer, image_tokens: int, text_tokens: int) -> dict:
    """Model FLOPs of one FLUX forward and backward per sample: 2 per multiply-add of every Linear
    (LoRA branches included) and of attention (QK^T and PV over the joint sequence). Backward
    counts the weight gradient of trained weights and the input gradient wherever the input
    depends on trained weights; attention backward is twice its forward."""
    from peft.tuners.lora import LoraLayer

    out = {"linear_forward": 0, "linear_backward": 0}
    # the conditioning path (time / guidance / pooled embedders, modulation linears) needs input
    # gradients only where something in it trains (a full fine-tune; not the default LoRA targets)
    conditioning_trains = any(p.requires_grad for n, p in transformer.named_parameters() if _conditioning(n))
    # the first block's q / k / v projections read the embedded inputs straight
    embedders_train = any(p.requires_grad for n, p in transformer.named_parameters()
                          if n.startswith(("x_embedder.", "context_embedder.")))
    for name, m in transformer.named_modules():
        if isinstance(m, LoraLayer) or not isinstance(m, torch.nn.Linear):
            continue
        layer = name.replace(".base_layer", "").split(".lora_")[0]
        f = 2 * _tokens_of(layer, image_tokens, text_tokens) * m.in_features * m.out_features
        input_grad = not (layer in FIRST_LAYERS and ".lora_B" not in name) and (
            conditioning_trains or not _conditioning(layer)) and (
            embedders_train or ".lora_B" in name or not layer.startswith(FIRST_PROJECTIONS))
        out["linear_forward"] += f
        out["linear_backward"] += f * (int(m.weight.requires_grad) + int(input_grad))
    s = image_tokens + text_tokens
    cfg = transformer.config
    out["attention_forward"] = 4 * s * s * cfg.num_attention_heads * cfg.attention_head_dim * (
        cfg.num_layers + cfg.num_single_layers)
    out["forward"] = out["linear_forward"] + out["attention_forward"]
    out["backward"] = out["linear_backward"] + 2 * out["attention_forward"]
    return out


def counted_flops(model, cfg, mode: str) -> dict:
    """Model FLOPs of one forward of the built transformer per sample, counted by torch's
    FlopCounterMode on the device (no gradient; math attention, whose matmuls it counts), and
    the backward as 2 x forward (full: weight and input gradients) or forward plus the adapters'
    own (LoRA: input gradients, and the adapters' weight gradients): any family's, where
    :func:`transformer_flops` is FLUX.1's formula (tests/test_gpu_benchmark.py: the forward
    equal to it, the step within 10 %)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.transformer.parameters()).device
    latents = torch.randn(model.latent_shape(1, cfg.rollout.height, cfg.rollout.width), device=device)
    cond = model.encode_prompts(list(cfg.data.prompts[:1]))  # the run's text cache
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.velocity(latents, torch.tensor([0.5], device=device), cond, cfg.rollout.guidance)
    forward = counter.get_total_flops()
    adapters = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                   if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"]))
    return {"forward": forward, "backward": 2 * forward if mode == "full" else forward + adapters,
            "counted": "FlopCounterMode"}


# ---------------------------------------------------------------------- one mode

def world() -> int:
    """Processes of this run: torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_config(tiny: bool, mode: str, size: int, rollout_steps: int, device: str, rank: int = 64,
                family: str = "flux"):
    from srpo.bench import real_dims as rd

    return rd.config(mode, size, rollout_steps, device, rank=rank, tiny=tiny, family=family, procs=world())


def flagship_depth(family: str) -> tuple[int, int]:
    """(double-stream or only blocks, single-stream blocks) of the family's flagship transformer,
    from its plan parts (meta device)."""
    from srpo.bench import real_dims as rd
    from srpo.models import family as family_cls
    from srpo.parallel import blocks

    tr = family_cls(family).plan_parts(None, {}, 64, 64).transformer
    if family in rd.DOUBLE_SINGLE:
        return len(tr.transformer_blocks), len(tr.single_transformer_blocks)
    return len(blocks(tr)), 0


def run_mode(mode: str, args, compile: str = "none") -> dict:
    from srpo import parallel, step as steps
    from srpo.bench import real_dims as rd

    cfg = make_config(args.tiny, mode, args.size, args.rollout_steps, "cpu" if args.tiny else "cuda", args.rank,
                      args.family)
    cfg.train.compile = compile  # srpo.setup.prepare compiles the transformer (its first update pays the compile)
    if mode == "lora":
        cfg.model.quantize = args.quantize  # the frozen base (srpo.setup.prepare quantizes it; the plan counts it)
    ctx = parallel.setup(cfg)
    device = ctx.device
    dims = dataclasses.replace(rd.TINY if args.tiny else rd.REAL, model=args.family).blocks(args.double, args.single)
    t_build = time.perf_counter()
    model = rd.build_model(dims, device, torch.bfloat16 if mode == "lora" else torch.float32)
    reward = rd.build_reward(dims, device, arch=args.reward_arch)
    sgd = mode == "full" and args.full_optimizer == "sgd"
    run = rd.prepare_run(cfg, model, reward, ctx,
                         optimizer=(lambda ps: torch.optim.SGD(ps, lr=cfg.train.lr)) if sgd else None)
    if args.family == "flux":
        flops = transformer_flops(model.transformer, *_tokens(model, cfg))
    else:
        flops = counted_flops(model, cfg, mode)
    steps._sync(device)
    build_s = time.perf_counter() - t_build

    rows = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = steps.update(model, run.algorithm, run.optimizer, run.params, run.batches, cfg, ctx, step)
        row = {"rollout_s": r["rollout_s"], "grad_step_s": r["grad_s"], "optimizer_s": r["optimizer_s"],
               "update_s": r["seconds"], "loss": r["loss"], "grad_norm": r["grad_norm"]}
        if device.type == "cuda":
            row["peak_gib"] = _largest(torch.cuda.max_memory_allocated(device) / 2**30, ctx)
            row["reserved_gib"] = _largest(torch.cuda.max_memory_reserved(device) / 2**30, ctx)
        rows.append(row)
        print(f"[{mode}] update {step + 1}: {r['seconds']:.2f} s", file=sys.stderr, flush=True)
    timed = rows[args.warmup:]
    first_update_s = rows[0]["update_s"]
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0]}
    grad_flops = 2 * (flops["forward"] + flops["backward"])  # two branches, batch 1
    peak = args.peak_tflops or _peak_tflops(device)
    plan = _plan(cfg, dims, rd.reward_arch_of(reward), sgd, ctx.world)
    result = {
        "family": args.family, "procs": ctx.world, "mode": mode, "compile": compile, "first_update_s": first_update_s, "device": _device_name(device), "size": args.size, "blocks": [dims.double, dims.single],
        "rollout_steps": args.rollout_steps, "lora_rank": args.rank if mode == "lora" else None,
        "optimizer": type(run.optimizer).__name__, "quantize": cfg.model.quantize, "trainable_params": sum(p.numel() for p in run.params),
        "transformer_params": sum(p.numel() for p in model.transformer.parameters()),
        "prompts_encoded": run.encoded, "text_encoders_released": not model.text_encoders(),
        "build_s": build_s, **mean,
        "peak_gib": max(r["peak_gib"] for r in timed) if "peak_gib" in timed[0] else None,
        "reserved_gib": max(r["reserved_gib"] for r in timed) if "reserved_gib" in timed[0] else None,
        "grad_step_tflop": grad_flops / 1e12,
        "grad_step_tflops_per_s": grad_flops / mean["grad_step_s"] / 1e12,
        "mfu": grad_flops / mean["grad_step_s"] / (peak * 1e12) if peak else None,
        "plan_gib": plan["total"] / 2**30, "plan_parts_gib": {k: v / 2**30 for k, v in plan.items() if v},
    }
    if result["peak_gib"]:
        result["plan_over_peak"] = result["plan_gib"] / result["peak_gib"]
    del model, reward, run
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    parallel.teardown(ctx)
    return result


def _tokens(model, cfg) -> tuple[int, int]:
    _, _, h, w = model.latent_shape(1, cfg.rollout.height, cfg.rollout.width)
    return (h // 2) * (w // 2), model.max_sequence_length


def _largest(value: float, ctx) -> float:
    """The largest rank's ``value`` (this process's without a group)."""
    if ctx.world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _plan(cfg, dims, reward_arch, sgd: bool, gpus: int = 1) -> dict:
    """``srpo plan``'s estimate per GPU on ``gpus`` for exactly this build (SGD: no optimizer state)."""
    from srpo.bench import real_dims as rd
    from srpo.plan import estimate_for

    sizes = rd.plan_sizes(cfg, dims, reward_arch)
    return estimate_for(cfg, sizes, gpus=gpus, device="cuda", optimizer="sgd" if sgd else "adamw")


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _peak_tflops(device) -> float | None:
    name = _device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ---------------------------------------------------------------------- main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU dry run at tiny dims (seconds)")
    p.add_argument("--family", default="flux", help="flux (FLUX.1-dev, default), flux2, qwen_image, sd3, z_image")
    p.add_argument("--modes", default="lora", help="comma list of lora, full (default lora)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 720; --tiny 32)")
    p.add_argument("--double", type=int, default=None,
                   help="double-stream blocks, or the blocks of a family without single-stream ones "
                        "(default: the flagship's, FLUX.1-dev 19; --tiny 1)")
    p.add_argument("--single", type=int, default=None,
                   help="single-stream blocks of FLUX families (default: the flagship's, FLUX.1-dev 38; --tiny 1)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (alpha = rank; default 64)")
    p.add_argument("--rollout-steps", type=int, default=None, help="Euler steps of the rollout (default 25; --tiny 2)")
    p.add_argument("--steps", type=int, default=2, help="timed updates per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--full-optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--quantize", choices=["none", "int8", "fp8", "nf4"], default="none",
                   help="lora mode: the frozen base quantized (model.quantize; default none: bf16)")
    p.add_argument("--compile", default="none",
                   help="comma list of train.compile modes to measure per mode: none (eager), blocks, model "
                        "(default none); the first update of each includes its compile (first_update_s)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: by name)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 720)
    args.rollout_steps = args.rollout_steps or (2 if args.tiny else 25)
    from srpo.bench import real_dims as rd

    if args.family not in rd.FAMILIES:
        p.error(f"--family {args.family}: use one of {', '.join(rd.FAMILIES)}")
    depth = (1, 1 if args.family in rd.DOUBLE_SINGLE else 0) if args.tiny else flagship_depth(args.family)
    args.double = depth[0] if args.double is None else args.double
    args.single = (depth[1] if args.single is None else args.single) if args.family in rd.DOUBLE_SINGLE else 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("lora", "full")]
    if bad or not modes:
        p.error(f"unknown mode {bad[0] if bad else '(none)'}: use lora, full")
    if args.steps < 1 or args.warmup < 0 or args.rank < 1 or args.double < 0 or args.single < 0:
        p.error("--steps and --rank must be positive, --warmup, --double and --single not negative")
    if args.size % 16:
        p.error(f"--size must be a multiple of 16 (got {args.size})")
    args.modes = modes
    args.compile = [c.strip() for c in args.compile.split(",") if c.strip()]
    if not args.compile or any(c not in ("none", "blocks", "model") for c in args.compile):
        p.error(f"--compile {','.join(args.compile) or '(none)'}: use a comma list of none, blocks, model")
    return args


def main(argv=None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_update.py: no CUDA device: run with --tiny for the CPU dry run", file=sys.stderr)
        raise SystemExit(2)
    results, lead = [], int(os.environ.get("RANK", "0")) == 0
    with tempfile.TemporaryDirectory() as tmp:
        from srpo.bench import real_dims as rd

        args.reward_arch = rd.tiny_reward_arch(tmp) if args.tiny else None
        for mode in args.modes:
            for compile in args.compile:
                torch._dynamo.reset()  # each compiled mode pays its own compile in its first update
                r = run_mode(mode, args, compile)
                eager = next((e for e in results if e["mode"] == mode and e["compile"] == "none"), None)
                if compile != "none" and eager is not None:
                    r["speedup_over_eager"] = eager["update_s"] / r["update_s"]
                results.append(r)
                if lead:
                    print(json.dumps(r), flush=True)
    if not lead:  # rank 0 reports (every rank measured: peaks are the largest rank's)
        return results
    print(f"\n{args.family}, {world()} process(es)")
    print("\n| mode | compile | optimizer | peak GiB (plan) | update s | first update s | rollout s | grad step s | "
          "grad step TFLOP/s | MFU | speed over eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "n/a"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        speed = f"{r['speedup_over_eager']:.2f}" if "speedup_over_eager" in r else "-"
        print(f"| {r['mode']} | {r['compile']} | {r['optimizer']} | {peak} ({r['plan_gib']:.1f}) | {r['update_s']:.2f} | "
              f"{r['first_update_s']:.2f} | {r['rollout_s']:.2f} | {r['grad_step_s']:.2f} | "
              f"{r['grad_step_tflops_per_s']:.1f} | {mfu} | {speed} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
