"""srpo score --reward NAME_OR_CONFIG --images DIR --prompts FILE [--pos WORD --neg WORD] [--output CSV]

Scores a folder of images with any reward, absolute and (for text-conditioned rewards)
semantic-relative, and writes one CSV row per image: the way to check a reward before training.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score a folder of images with a reward (absolute and SRP) into a CSV")
    p.add_argument("--reward", required=True,
                   help="a reward name (hps, pickscore, clip, aesthetic, tiny_clip, or a dotted path), or a "
                        "YAML file: a training config (its reward: section) or a reward spec / list of specs")
    p.add_argument("--reward-path", default=None, help="checkpoint file or folder of a reward given by name")
    p.add_argument("--images", required=True, help="folder of images, scored in sorted file-name order")
    p.add_argument("--prompts", required=True,
                   help="one prompt per image (same order), or a single prompt for all: a text file (one per "
                        "line), .jsonl, .csv, .parquet or a datasets folder (see --prompt-column)")
    p.add_argument("--prompt-column", default="prompt",
                   help="the prompt field of a .jsonl / .csv / .parquet / datasets --prompts (default: prompt)")
    p.add_argument("--pos", default=None, help="positive SRP control word (default: the first realism word)")
    p.add_argument("--neg", default=None, help="negative SRP control word (default: the first realism word)")
    p.add_argument("--k", type=float, default=0.0, help="SRP weight k in (1 + k) pos - neg (default 0: paper form)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--output", "-o", default=None, help="CSV file to write (default: standard output)")


def reward_spec(value: str, reward_path: str | None):
    """A name -> ``{"name", "path"}``; a YAML file -> its reward section, paths made relative
    to the file's folder."""
    import yaml

    path = Path(value)
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        return {"name": value, "path": reward_path}
    if not path.is_file():
        raise UserError(f"reward config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"reward config {path} is not valid YAML: fix the syntax") from None
    spec = tree.get("reward") if isinstance(tree, dict) and "reward" in tree else tree
    if not spec:
        raise UserError(f"reward config {path} has no reward: write name: ... (and path:, options:)")
    specs = spec if isinstance(spec, list) else [spec]
    for s in specs:
        if isinstance(s, dict) and s.get("path") and not Path(s["path"]).is_absolute():
            s["path"] = str((path.resolve().parent / s["path"]))
    return spec


def image_files(folder: str) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"--images {d} is not a folder of images")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    from PIL import Image

    for f in files:  # a cheap header check, before any model is loaded
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception:  # noqa: BLE001 - PIL raises many types for a broken file
            raise UserError(f"cannot read image {f}: not a valid image file") from None
    return files


def read_prompts(file: str, n_images: int, column: str = "prompt") -> list[str]:
    """The prompts of ``file`` in any format training reads (text, .jsonl, .csv, .parquet, a
    datasets folder: srpo.data.load_prompts), one per image or one for all."""
    from ..data import load_prompts

    prompts = load_prompts(file, "--prompts", column)
    path = Path(file)
    if len(prompts) == 1:
        return prompts * n_images
    if len(prompts) != n_images:
        raise UserError(f"--prompts file {path} has {len(prompts)} prompts for {n_images} images: "
                        "give one per image (sorted file-name order) or a single one for all")
    return prompts


def load_image(file: Path):
    """[1, 3, H, W] float in [0, 1]."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError):
        raise UserError(f"cannot read image {file}: not a valid image file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255


def score_rows(reward, files: list[Path], prompts: list[str], pos: str | None, neg: str | None,
               k: float, device) -> list[dict]:
    """One dict per image: file, prompt, score (and srp, srp_pos, srp_neg, per-term values)."""
    import torch

    from ..rewards.srp import SRP

    srp = SRP(reward, [pos], [neg]) if pos is not None else None
    rows = []
    with torch.no_grad():
        for file, prompt in zip(files, prompts):
            x = load_image(file).to(device)
            row = {"file": file.name, "prompt": prompt, "score": float(reward.score(x, [prompt])[0])}
            if hasattr(reward, "terms"):
                row.update({f"term:{n}": float(v[0]) for n, v in reward.terms(x, [prompt]).items()})
            if srp is not None:
                out = srp.relative(x, [prompt], pos, neg, k)
                row.update(srp=float(out.relative[0]), srp_pos=float(out.pos[0]), srp_neg=float(out.neg[0]))
                row.update({f"srp_term:{n}": float(v[0]) for n, v in out.terms.items()})
            rows.append(row)
    return rows


def write_csv(rows: list[dict], output: str | None) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    if output is None:
        sys.stdout.write(buf.getvalue())
        return
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(buf.getvalue(), encoding="utf-8")


def run(args) -> int:
    from ..parallel import pick_device
    from ..rewards.factory import build_reward
    from ..rewards.srp import DEFAULT_NEG_WORDS, DEFAULT_POS_WORDS

    files = image_files(args.images)
    prompts = read_prompts(args.prompts, len(files), args.prompt_column)
    device = pick_device(args.device)
    reward = build_reward(reward_spec(args.reward, args.reward_path), device=device).frozen()
    pos = neg = None
    if reward.text_conditioned:
        pos = args.pos or DEFAULT_POS_WORDS[0]
        neg = args.neg or DEFAULT_NEG_WORDS[0]
    elif args.pos or args.neg:
        raise UserError(f"--pos/--neg need a text-conditioned reward; {args.reward} scores images only "
                        "(its absolute score is written, SRP does not apply)")
    rows = score_rows(reward, files, prompts, pos, neg, args.k, device)
    write_csv(rows, args.output)
    mean = sum(r["score"] for r in rows) / len(rows)
    extra = f", mean SRP ({pos} vs {neg}) {sum(r['srp'] for r in rows) / len(rows):.4f}" if pos else ""
    where = f" to {args.output}" if args.output else ""
    print(f"scored {len(rows)} images{where}: mean score {mean:.4f}{extra}", file=sys.stderr)
    return 0
