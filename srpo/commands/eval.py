"""srpo eval MODEL_OR_RUN... --prompts FILE [--which base,best,final,step-N] [--reward NAME[=PATH] ...]
[--seeds S] [--schedule pipeline|training] --output DIR

Renders every checkpoint named on the same prompts and seeds with the guard's renderer, scores each
image with every reward, and writes eval.json, eval.csv, eval.md and eval.html (docs/eval.md)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="render checkpoints on one prompt set and seeds, score them with several "
                                    "rewards: mean, bootstrap interval, win rate against the base (docs/eval.md)")
    p.add_argument("sources", nargs="+", metavar="MODEL_OR_RUN",
                   help="diffusers pipeline folders of any family and/or run folders written by srpo train")
    p.add_argument("--prompts", required=True,
                   help="prompt file in any form training reads: text (one per line), .jsonl, .csv, .parquet, "
                        "or a datasets folder")
    p.add_argument("--prompt-column", default="prompt", help="the prompt field of a .jsonl / .csv / .parquet / datasets "
                                                             "--prompts (default: prompt)")
    p.add_argument("--which", default=None,
                   help="of each run: base, best, final, step-N, comma-separated (default: base, best if kept, final)")
    p.add_argument("--reward", "--rewards", dest="rewards", action="append", default=[], metavar="SPEC",
                   help="NAME or NAME=PATH (repeatable, or comma-separated), a YAML reward spec / list / config, "
                        "or lab_realism / lab_fidelity (the lab's judge); default: the first run's reward and "
                        "guard.judges")
    p.add_argument("--seeds", type=int, default=2, help="fixed seeds per prompt (default 2)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the first run's data.eval_seed, else 1234)")
    p.add_argument("--schedule", choices=["pipeline", "training"], default="pipeline",
                   help="pipeline (default): as the family's diffusers pipeline renders for a user (FLUX.1: the folder "
                        "scheduler's dynamic shift); training: as the trainer rolls out (FLUX.1: fixed shift 3, "
                        "timesteps floored to 1/1000)")
    p.add_argument("--steps", type=int, default=None, help="default: the first run's data.eval_steps, else 50")
    p.add_argument("--guidance", type=float, default=None,
                   help="default: the first run's data.eval_guidance, else each family's usual value")
    p.add_argument("--height", type=int, default=None, help="default: the first run's rollout size, else 1024")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--model-option", dest="model_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the family's load() for the pipeline folders named (model.options: e.g. "
                        "max_sequence_length=512; docs/models.md lists each family's); runs use their own config's")
    p.add_argument("--baseline", default=None,
                   help="the checkpoint win rates are against (default: the base, else the first)")
    p.add_argument("--batch", type=int, default=8, help="images per rollout batch (default 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--output", "-o", required=True, help="folder for eval.json, eval.csv, eval.md, eval.html, images/")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") or "model"


def _settings(args, ckpts) -> dict:
    cfg = next((c.cfg for c in ckpts if c.cfg is not None), None)
    d, r = (cfg.data, cfg.rollout) if cfg is not None else (None, None)
    s = {"seeds": args.seeds, "seed": args.seed if args.seed is not None else (d.eval_seed if d else 1234),
         "steps": args.steps or (d.eval_steps if d else 50), "guidance": args.guidance,
         "height": args.height or (r.height if r else 1024), "width": args.width or (r.width if r else 1024),
         "schedule": args.schedule, "batch": args.batch}
    if s["guidance"] is None and d is not None:
        s["guidance"] = d.eval_guidance
    for name in ("seeds", "steps", "height", "width", "batch"):
        if s[name] < 1:
            raise UserError(f"--{name} must be a positive integer (got {s[name]})")
    return s


def run(args) -> int:
    import torch

    from ..data import load_prompts
    from ..eval import checkpoints, outputs, render, scorers, stats
    from ..parallel import pick_device

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a folder")
    if (out / "eval.json").exists():
        raise UserError(f"--output {out} already holds an evaluation (eval.json): choose a new folder or delete it")
    prompts = load_prompts(args.prompts, "--prompts", args.prompt_column)
    ckpts = checkpoints.resolve(args.sources, checkpoints.parse_which(args.which),
                                checkpoints.parse_options(args.model_options))
    settings = _settings(args, ckpts)
    first_cfg = next((c.cfg for c in ckpts if c.cfg is not None), None)
    if args.rewards:
        specs = scorers.parse(args.rewards)
    elif first_cfg is not None:
        specs = scorers.from_config(first_cfg)
    else:
        specs = []
    specs = scorers.check(specs)  # every name and file, before anything renders
    scorers.default_frames(specs, first_cfg)
    labels = [c.label for c in ckpts]
    baseline = args.baseline or next((c.label for c in ckpts if c.is_base), labels[0])
    if baseline not in labels:
        raise UserError(f"--baseline {baseline} is not one of the checkpoints: {', '.join(labels)}")
    device = pick_device(args.device)
    every, _ = render.image_prompts(prompts, settings["seeds"])

    images, entries = {}, []
    for i, c in enumerate(ckpts):
        model = c.load(device).use_schedule(args.schedule)
        guidance = model.default_guidance if settings["guidance"] is None else settings["guidance"]
        images[c.label] = render.render(model, prompts, settings["seeds"], settings["seed"], settings["steps"],
                                        guidance, settings["height"], settings["width"], settings["batch"],
                                        desc=f"render {c.label} ({i + 1}/{len(ckpts)})")
        folder = f"images/{_slug(c.label)}"
        names = render.save(images[c.label], out / folder, settings["seeds"])
        entries.append({"label": c.label, "source": str(Path(c.source).resolve()), "which": c.which,
                        "family": model.family, "guidance": guidance, "dir": folder, "images": names})
        if images[c.label].ndim == 5:  # videos: animated previews beside the first frames' PNGs
            entries[-1].update(frames=int(images[c.label].shape[1]),
                               videos=render.save_videos(images[c.label], out / folder, settings["seeds"]))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if settings["guidance"] is None:
        settings["guidance"] = entries[0]["guidance"]

    from tqdm import tqdm

    scores = {}
    for spec in specs:
        scorer = scorers.Scorer(spec, device)
        per = scores[spec["label"]] = {}
        with tqdm(total=len(every) * len(ckpts), desc=f"score {spec['label']}", unit="img", leave=False) as bar:
            for label, u8 in images.items():
                values = []
                for s in range(0, len(every), 16):
                    values += scorer(render.as_float(u8[s:s + 16]), every[s:s + 16]).tolist()
                    bar.update(min(16, len(every) - s))
                per[label] = values
        scorer.close()
        del scorer

    settings.update(prompts=len(prompts), resamples=stats.RESAMPLES, bootstrap_seed=stats.SEED)
    video = any("videos" in e for e in entries)
    if video:
        frames = sorted({e["frames"] for e in entries if "frames" in e})
        settings["frames"] = frames[0] if len(frames) == 1 else frames
    keys = ("label", "name", "path", "options", "frames") if video else ("label", "name", "path", "options")
    data = {"settings": settings, "baseline": baseline, "prompts": prompts, "checkpoints": entries,
            "rewards": [{k: s.get(k) for k in keys} for s in specs],
            "results": outputs.results(scores, settings["seeds"], baseline), "scores": scores}
    outputs.write_all(data, out)
    sys.stdout.write(outputs.markdown(data))
    print(f"wrote eval.json, eval.csv, eval.md, eval.html (scores.csv, images/) to {out}")
    return 0
