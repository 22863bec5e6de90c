"""``train.compile`` on the lab weights: the rollout + decode (25 Euler steps, 8 held-out prompts,
the lab's guidance) eager against ``blocks`` and ``model`` compilation, in one process, as ratios
(eager seconds over compiled seconds, steady state, the median of ``--repeats``), the one-time
compile seconds apart, and the largest pixel difference against eager.

    OMP_NUM_THREADS=1 python benchmarks/compile_rollout.py --out compile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing


def _timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="blocks,model")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    from srpo import compilation, seeding
    from srpo.config import load_config
    from srpo.data import load_prompts
    from srpo.lab.run import CONFIG
    from srpo.models import load_model
    from srpo.sampling import rollout

    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    prompts = load_prompts(cfg.data.eval_prompts)[: a.prompts]
    results = {"prompts": len(prompts), "steps": a.steps, "modes": {}}
    eager_s = eager_img = None
    for mode in ["none", *a.modes.split(",")]:
        torch._dynamo.reset()
        model = load_model(cfg.model, torch.device("cpu"))
        cond = model.encode_prompts(prompts)
        noise = seeding.noise(model.latent_shape(1, cfg.rollout.height, cfg.rollout.width), 0, 0,
                              range(len(prompts)), "eval_noise")
        compilation.apply(model.transformer, mode)

        def run():
            with torch.no_grad():
                return model.decode(rollout(model, cond, noise, steps=a.steps, guidance=cfg.rollout.guidance))

        first = time.perf_counter()
        run()  # the compile (eager: a warm-up)
        first = time.perf_counter() - first
        seconds, images = _timed(run, a.repeats)
        if mode == "none":
            eager_s, eager_img = seconds, images
        results["modes"][mode] = {"seconds": seconds, "first_call_s": first, "speedup": eager_s / seconds,
                                  "max_pixel_diff": (images - eager_img).abs().max().item()}
        print(f"{mode:>6}: {seconds:.3f} s (first call {first:.1f} s), {eager_s / seconds:.2f}x eager, "
              f"max pixel diff {results['modes'][mode]['max_pixel_diff']:.1e}", flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
