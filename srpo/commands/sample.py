"""srpo sample --model DIR [--transformer DIR] (--prompt TEXT | --prompts FILE) ..."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="render images with a base model or a trained run")
    p.add_argument("--model", required=True,
                   help="a diffusers pipeline folder of a supported family, or a run folder written by "
                        "`srpo train` (uses its final weights)")
    p.add_argument("--transformer", default=None, help="folder of transformer weights replacing the model's")
    p.add_argument("--which", choices=["final", "best"], default="final",
                   help="of a run folder: its final/ weights or the guard's best/ (default final)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one prompt")
    g.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None,
                   help="as the family applies it (embedded guidance, CFG scale); default: the family's usual value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="default: the run's rollout size, else 1024")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--shift", type=float, default=None, help="time shift of the schedule (default: the family's rule)")
    p.add_argument("--schedule", choices=["pipeline", "training"], default="pipeline",
                   help="pipeline (default): as the family's diffusers pipeline renders (FLUX.1: the folder scheduler's "
                        "dynamic shift); training: as the trainer rolls out (FLUX.1: fixed shift 3, 1/1000 timesteps)")
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=None,
                   help="video models: frames per video (default: the run's rollout.frames, else the family's)")
    p.add_argument("--fps", type=int, default=None,
                   help="video models: frames per second of the mp4s and grid.gif (default 16, Wan 2.1's)")
    p.add_argument("--output", "-o", required=True,
                   help="folder for the PNGs and grid.png; video models also write an mp4 per video and grid.gif")


def _load(args):
    from .. import parallel
    from ..config import ModelConfig
    from ..models import family_of_folder, load_model

    device = parallel.pick_device(args.device)
    folder = Path(args.model)
    if not folder.is_dir():
        raise UserError(f"--model {folder} is not a folder: give a diffusers pipeline folder or a run folder")
    if (folder / "config.yaml").is_file() and ((folder / "final").is_dir() or (folder / "lora").is_dir()):  # a run
        from ..export import run_weights

        cfg, model = run_weights(folder, args.which)
        if args.transformer:
            model = load_model(cfg.model, device, transformer_path=args.transformer)
        if args.shift is not None:
            model.shift = args.shift
        return model.to(device), (cfg.rollout.height, cfg.rollout.width)
    m = ModelConfig(name=family_of_folder(folder), path=str(folder), shift=args.shift)
    return load_model(m, device, transformer_path=args.transformer), (1024, 1024)


def run(args) -> int:
    from ..data import load_prompts
    from ..evaluate import generate
    from ..runlog import save_grid, to_pil
    from ..video import FPS, write_grid_gif, write_mp4

    prompts = [args.prompt] if args.prompt is not None else load_prompts(args.prompts)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    for name in ("steps", "height", "width", "frames", "fps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name} must be a positive integer (got {v})")
    model, (h, w) = _load(args)
    model.use_schedule(args.schedule, shift=args.shift)  # --shift, when given, fixes the shift in either
    h, w = args.height or h, args.width or w
    if args.frames is not None:
        model.set_frames(args.frames)  # image families refuse it with one line
    guidance = model.default_guidance if args.guidance is None else args.guidance
    images = generate(model, prompts, args.seed, args.steps, guidance, h, w)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    video = images.ndim == 5  # [N, F, 3, H, W]
    fps = args.fps or FPS
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40]
        to_pil(img if img.ndim == 3 else img[0]).save(out / f"{i:04d}-{slug}.png")  # a video: its first frame
        if video:
            write_mp4(img, out / f"{i:04d}-{slug}.mp4", fps=fps)
    save_grid(images, out / "grid.png")  # a video: a row of its frames
    if video:
        write_grid_gif(images, out / "grid.gif", fps=fps)
        print(f"wrote {len(prompts)} videos ({images.shape[1]} frames, {fps} fps: an mp4 and its first frame's PNG "
              f"each), grid.png and grid.gif to {out}")
    else:
        print(f"wrote {len(prompts)} images and grid.png to {out}")
    return 0
