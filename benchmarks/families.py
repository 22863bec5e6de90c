"""Every model family on its tiny random weights: rollout + decode against the family's own
diffusers pipeline, SRPO's update against the sum of its parts, and ``srpo plan`` at real sizes.

    OMP_NUM_THREADS=1 python benchmarks/families.py --out runs/families.json

Ratios are taken between interleaved measurements in one run (``srpo.bench.measure``), never
as absolute times: (d) ``speed_over_diffusers`` = pipeline seconds / ours (>= 1.0 the goal),
(c) ``update_over_parts`` = a whole update / the sum of its parts timed alone (<= 1.10).
The plan part prints ``srpo plan``'s per-GPU estimate of each family's flagship at 720 x 720:
LoRA r64 on one GPU, full fine-tune under FSDP2 on 8.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a checkout without installing



def families() -> dict:
    """Registry name -> class of every registered family with a built-in config for its tiny twin."""
    from srpo.models import MODELS

    return {n: c for n in MODELS.names() if not (c := MODELS.get(n)).is_twin() and c.tiny_config}


def measure_family(name: str, repeats: int, steps: tuple[int, ...]) -> dict:
    from srpo.bench.parts import Bench, srpo_parts, timed_rollout
    from srpo.config import load_config

    config = families()[name].tiny_config
    cfg = load_config(config, ["guard.enabled=false", "log.progress=false"])
    bench = Bench(cfg, torch.device("cpu"))
    d = timed_rollout(bench.model, cfg, bench.prompts, cfg.rollout.guidance, steps, repeats, torch.device("cpu"))
    c = srpo_parts(bench, repeats=repeats)
    return {"config": config, "guidance": cfg.rollout.guidance, "d": d, "c": c}


def plan_family(name: str) -> dict:
    from srpo.config import load_config
    from srpo.plan import GiB, estimate_for, model_sizes

    base = {"model": {"name": name, "dtype": "bfloat16"}, "reward": {"name": "hps"},
            "rollout": {"height": 720, "width": 720},
            "train": {"batch_size": 1, "autocast": "bf16", "gradient_checkpointing": True},
            "data": {"prompts": ["a cat"]}, "memory": {"offload_frozen": True}}
    lora = load_config({**base, "lora": {"enabled": True, "rank": 64, "alpha": 64}})
    full = load_config({**base, "parallel": {"strategy": "fsdp"}})
    sizes = model_sizes(lora)
    return {"model": families()[name].title, "transformer_params": sizes.transformer,
            "text_encoder_params": sizes.text_encoders,
            "lora_r64_1gpu_gib": estimate_for(lora, sizes, 1)["total"] / GiB,
            "full_fsdp_8gpu_gib": estimate_for(full, model_sizes(full), 8, "fsdp", False)["total"] / GiB}


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = families()
    p.add_argument("--families", default=",".join(known), help="comma list of " + ", ".join(known))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", default="25,50", help="rollout step counts for (d)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    bad = [n for n in names if n not in known]
    if bad:
        p.error(f"unknown family {bad[0]}: use {', '.join(known)}")
    steps = tuple(int(s) for s in args.steps.split(","))
    out = {"tiny": {}, "plan": {}}
    for name in names:
        out["tiny"][name] = r = measure_family(name, args.repeats, steps)
        worst = min(v["speed_over_diffusers"] for k, v in r["d"].items() if k != "pipeline")
        print(f"{name}: rollout over {r['d']['pipeline']} {worst:.3f} (worst of {steps}), "
              f"update over parts {r['c']['update_over_parts']:.3f}", flush=True)
        out["plan"][name] = q = plan_family(name)
        print(f"{name}: plan at 720x720 ({q['model']}): LoRA r64 1 GPU {q['lora_r64_1gpu_gib']:.1f} GiB, "
              f"full FSDP2 8 GPUs {q['full_fsdp_8gpu_gib']:.1f} GiB per GPU", flush=True)
    print("\n| family | pipeline | rollout speed over diffusers (25 / 50 steps) | max pixel diff | "
          "update over parts | plan: LoRA r64, 1 GPU | plan: full FSDP2, 8 GPUs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in out["tiny"].items():
        d = r["d"]
        speeds = " / ".join(f"{d[str(s)]['speed_over_diffusers']:.2f}" for s in steps)
        diff = max(d[str(s)]["max_pixel_difference"] for s in steps)
        q = out["plan"][name]
        print(f"| {name} | {d['pipeline']} | {speeds} | {diff:.1e} | {r['c']['update_over_parts']:.3f} | "
              f"{q['lora_r64_1gpu_gib']:.1f} GiB | {q['full_fsdp_8gpu_gib']:.1f} GiB |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
