"""srpo sample --model DIR [--transformer DIR] (--prompt TEXT | --prompts FILE) ..."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="render images with a base model or a trained run")
    p.add_argument("--model", required=True,
                   help="a diffusers FLUX folder, or a run folder written by `srpo train` (uses its final weights)")
    p.add_argument("--transformer", default=None, help="folder of transformer weights replacing the model's")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one prompt")
    g.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="default: the run's rollout size, else 1024")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", "-o", required=True, help="folder for the PNGs and grid.png")


def _load(args):
    from .. import parallel
    from ..trainer import DTYPES
    from ..models import MODELS

    device = parallel.pick_device(args.device)
    folder = Path(args.model)
    if not folder.is_dir():
        raise UserError(f"--model {folder} is not a folder: give a diffusers FLUX folder or a run folder")
    if (folder / "config.yaml").is_file() and (folder / "final").is_dir():  # a run folder
        from ..config import load_config

        cfg = load_config(folder / "config.yaml")
        m = cfg.model
        transformer = args.transformer or str(folder / "final")
        model = MODELS.get(m.name)(path=m.path, transformer_path=transformer, device=device,
                                   dtype=DTYPES[m.dtype], **m.options)
        return model, (cfg.rollout.height, cfg.rollout.width)
    model = MODELS.get("flux")(path=str(folder), transformer_path=args.transformer, device=device)
    return model, (1024, 1024)


def run(args) -> int:
    from ..data import load_prompts
    from ..evaluate import generate
    from ..runlog import save_grid, to_pil

    prompts = [args.prompt] if args.prompt is not None else load_prompts(args.prompts)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    for name in ("steps", "height", "width"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be a positive integer (got {v})")
    model, (h, w) = _load(args)
    h, w = args.height or h, args.width or w
    images = generate(model, prompts, args.seed, args.steps, args.guidance, args.shift, h, w)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40]
        to_pil(img).save(out / f"{i:04d}-{slug}.png")
    save_grid(images, out / "grid.png")
    print(f"wrote {len(prompts)} images and grid.png to {out}")
    return 0
