"""One SRPO update on a FLUX.1-dev-sized transformer: peak memory, seconds, MFU.

    python benchmarks/gpu_update.py                 # GPU: FLUX.1-dev dims at 720x720, LoRA then full
    python benchmarks/gpu_update.py --tiny          # CPU dry run of the same code path, seconds
    python benchmarks/gpu_update.py --modes lora --steps 3 --out bench.json

Random weights at the real dimensions (19 double + 38 single blocks, width 3072, 24 heads; the
FLUX VAE; a ViT-H/14 CLIP reward), the project's own pieces in the trainer's order: LoRA,
memory preparation (fp32 master weights, activation checkpointing, cached text features with
the text encoders kept off the GPU), the parallel wrapper, a 25-step rollout, SRPO's two
branches, clipping, the optimizer step. Modes:

- ``lora``: rank-16 adapters on a bf16 base, AdamW.
- ``full``: every transformer weight trained in fp32 under FSDP2 on one rank. AdamW's 95 GB of
  state does not fit beside 95 GB of fp32 weights and gradients on one 141 GB GPU, so this
  mode steps with SGD by default (``--full-optimizer adamw`` where it fits); the AdamW share
  at N GPUs is what ``srpo plan`` adds.

MFU counts the transformer's model FLOPs of the gradient step (both branches, forward and
backward, no recompute; frozen LoRA bases get no weight gradients) over the measured time of
the gradient step (VAE decode and reward included) at the GPU's dense bf16 peak.
The text encoders are narrow stand-ins of the right widths: they run once, outside the timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
VIT_H = dict(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              vocab_size=49408, max_position_embeddings=77),
             vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                image_size=224, patch_size=14),
             projection_dim=1024)
TINY_CLIP = dict(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=49408, max_position_embeddings=77),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=32, patch_size=8),
                 projection_dim=32)
TINY_FLUX = dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 axes_dims_rope=(4, 6, 6), text_dim=32, max_sequence_length=16)


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


def transformer_flops(transformer, image_tokens: int, text_tokens: int) -> dict:
    """Model FLOPs of one FLUX forward and backward per sample: 2 per multiply-add of every Linear
    (LoRA branches included) and of attention (QK^T and PV over the joint sequence). Backward
    counts the weight gradient of trained weights and the input gradient wherever the input
    depends on the model; attention backward is twice its forward."""
    from peft.tuners.lora import LoraLayer

    out = {"linear_forward": 0, "linear_backward": 0}
    for name, m in transformer.named_modules():
        if isinstance(m, LoraLayer) or not isinstance(m, torch.nn.Linear):
            continue
        layer = name.replace(".base_layer", "").split(".lora_")[0]
        f = 2 * _tokens_of(layer, image_tokens, text_tokens) * m.in_features * m.out_features
        input_grad = not (layer in FIRST_LAYERS and ".lora_B" not in name)
        out["linear_forward"] += f
        out["linear_backward"] += f * (int(m.weight.requires_grad) + int(input_grad))
    s = image_tokens + text_tokens
    cfg = transformer.config
    out["attention_forward"] = 4 * s * s * cfg.num_attention_heads * cfg.attention_head_dim * (
        cfg.num_layers + cfg.num_single_layers)
    out["forward"] = out["linear_forward"] + out["attention_forward"]
    out["backward"] = out["linear_backward"] + 2 * out["attention_forward"]
    return out


# ---------------------------------------------------------------------- building

def build_flux(tiny: bool, device: torch.device, lora_mode: bool, seed: int = 0):
    """A FluxModel at FLUX.1-dev dims (or the tiny test dims) with random weights."""
    from srpo.models.flux import FluxModel
    from srpo.models.tiny import build_tiny_flux

    if tiny:
        model = build_tiny_flux(seed, **TINY_FLUX)
        model.transformer.to(device, torch.bfloat16 if lora_mode else torch.float32)
        model.vae.to(device)
        return model
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from srpo.models.flux import FLUX_DEV
    from srpo.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16 if lora_mode else torch.float32)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False).to(torch.bfloat16)
    # text encoders of the right widths (CLIP-L pooled 768, T5-XXL 4096) but one narrow layer
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=256,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77))
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=4096, d_kv=32, d_ff=256, num_layers=1, num_heads=4,
                                 dropout_rate=0.0))
    tok = clip_tokenizer()
    return FluxModel(transformer, vae, clip, tok, t5, tok, max_sequence_length=512)


def build_reward(tiny: bool, device: torch.device, seed: int = 0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from srpo.rewards.clip import CLIPReward
    from srpo.rewards.preprocess import ImageTransform
    from srpo.tokenizer import clip_tokenizer

    spec = TINY_CLIP if tiny else VIT_H
    size = spec["vision_config"]["image_size"]
    torch.manual_seed(seed + 1)
    with torch.device(device):
        clip = CLIPModel(CLIPConfig(**spec)).eval()
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return CLIPReward(clip, ImageTransform.from_clip_processor(proc), clip_tokenizer(), divide_by=20.0).frozen()


def make_config(tiny: bool, mode: str, size: int, rollout_steps: int, device: str):
    from srpo.config import load_config

    model = {"name": "tiny_flux", "options": dict(TINY_FLUX)} if tiny else {"name": "flux", "dtype": "bfloat16"}
    return load_config({
        "model": model,
        "reward": {"name": "tiny_clip"} if tiny else {"name": "hps"},  # (sizes for the plan)
        "rollout": {"steps": rollout_steps, "guidance": 1.0, "height": size, "width": size},
        "train": {"batch_size": 1, "autocast": "bf16", "gradient_checkpointing": True, "device": device,
                  "lr": 5e-6, "grad_clip": 0.1, "max_steps": 1},
        "data": {"prompts": ["a photo of a red fox in the snow"]},
        "parallel": {"strategy": "fsdp" if mode == "full" else "none"},
        "lora": {"enabled": mode == "lora", "rank": 16, "alpha": 16},
        "memory": {"cache_text": True, "offload_frozen": True},
    })


# ---------------------------------------------------------------------- one mode

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, args) -> dict:
    from srpo import lora, memory, parallel, step as steps
    from srpo.algorithms import ALGORITHMS, RewardFn
    from srpo.rewards.srp import SRP
    from srpo.trainer import reward_autocast

    device_name = "cpu" if args.tiny else "cuda"
    cfg = make_config(args.tiny, mode, args.size, args.rollout_steps, device_name)
    ctx = parallel.setup(cfg)
    device = ctx.device
    t_build = time.perf_counter()
    model = build_flux(args.tiny, device, mode == "lora")
    reward = build_reward(args.tiny, device)
    lora.apply(model, cfg.lora, seed=0)
    memory.prepare(model, cfg)
    flops = transformer_flops(model.transformer, *_tokens(model, cfg))
    parallel.apply(model, cfg, ctx)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    if mode == "full" and args.full_optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.train.lr)
    else:
        optimizer = steps.make_optimizer(params, cfg)
    reward_fn = RewardFn(reward, SRP(reward, cfg.srp.pos_words, cfg.srp.neg_words), reward_autocast(cfg))
    algorithm = ALGORITHMS.get("srpo")(cfg, reward_fn)
    batches = steps.Batches(cfg, model, algorithm, cfg.data.prompts, ctx)
    steps._sync(device)
    build_s = time.perf_counter() - t_build
    model.encode_prompts(cfg.data.prompts)  # fill the text cache outside the timing

    rows = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = steps.update(model, algorithm, optimizer, params, batches, cfg, ctx, step)  # the trainer's update
        row = {"rollout_s": r["rollout_s"], "grad_step_s": r["grad_s"], "optimizer_s": r["optimizer_s"],
               "update_s": r["seconds"], "loss": r["loss"], "grad_norm": r["grad_norm"]}
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        rows.append(row)
    timed = rows[args.warmup:]
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0]}
    grad_flops = 2 * (flops["forward"] + flops["backward"])  # two branches, batch 1
    peak = args.peak_tflops or _peak_tflops(device)
    result = {
        "mode": mode, "device": _device_name(device), "size": args.size, "rollout_steps": args.rollout_steps,
        "optimizer": type(optimizer).__name__, "trainable_params": sum(p.numel() for p in params),
        "transformer_params": sum(p.numel() for p in model.transformer.parameters()),
        "build_s": build_s, **mean, "peak_gib": max((r["peak_gib"] for r in timed), default=None) if "peak_gib" in timed[0] else None,
        "grad_step_tflop": grad_flops / 1e12,
        "grad_step_tflops_per_s": grad_flops / mean["grad_step_s"] / 1e12,
        "mfu": grad_flops / mean["grad_step_s"] / (peak * 1e12) if peak else None,
        "plan_gib": _plan(cfg, type(optimizer).__name__),
    }
    del model, reward, optimizer, algorithm, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    parallel.teardown(ctx)
    return result


def _tokens(model, cfg) -> tuple[int, int]:
    _, _, h, w = model.latent_shape(1, cfg.rollout.height, cfg.rollout.width)
    return (h // 2) * (w // 2), model.max_sequence_length


def _plan(cfg, optimizer: str) -> float:
    """``srpo plan``'s one-GPU estimate for this run (stand-in text encoders: none; SGD: no
    optimizer state)."""
    from srpo.memory import FRAGMENTATION, GiB, estimate_for, model_sizes

    sizes = model_sizes(cfg)
    sizes.text_encoders = 0
    total = estimate_for(cfg, sizes, gpus=1)["total"]
    if optimizer == "SGD":
        total -= 8 * sizes.transformer * FRAGMENTATION
    return total / GiB


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _peak_tflops(device) -> float | None:
    name = _device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ---------------------------------------------------------------------- main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU dry run at tiny dims (seconds)")
    p.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 720; --tiny 32)")
    p.add_argument("--rollout-steps", type=int, default=None, help="Euler steps of the rollout (default 25; --tiny 2)")
    p.add_argument("--steps", type=int, default=2, help="timed updates per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first")
    p.add_argument("--full-optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: by name)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 720)
    args.rollout_steps = args.rollout_steps or (2 if args.tiny else 25)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("lora", "full")]
    if bad:
        p.error(f"unknown mode {bad[0]}: use lora, full")
    args.modes = modes
    return args


def main(argv=None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU dry run")
    results = []
    for mode in args.modes:
        r = run_mode(mode, args)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\n| mode | optimizer | peak GiB (plan) | update s | rollout s | grad step s | grad step TFLOP/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] else "n/a"
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        print(f"| {r['mode']} | {r['optimizer']} | {peak} ({r['plan_gib']:.1f}) | {r['update_s']:.2f} | "
              f"{r['rollout_s']:.2f} | {r['grad_step_s']:.2f} | {r['grad_step_tflops_per_s']:.1f} | {mfu} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
