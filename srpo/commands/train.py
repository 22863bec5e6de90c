"""srpo train CONFIG [--output DIR] [--set k=v ...] [--resume]"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with SRPO from a YAML config")
    p.add_argument("config", help="YAML config (see docs/config.md)")
    p.add_argument("--output", "-o", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint (implied when "
                   "torchrun --max-restarts restarts the workers)")


def run(args) -> int:
    from ..config import load_config
    from ..trainer import train

    cfg = load_config(args.config, args.overrides)
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    from ..parallel import restart_count

    if not args.resume and not restart_count() and (output / "checkpoints").is_dir() and any((output / "checkpoints").iterdir()):
        raise UserError(f"{output} already holds a run: pass --resume to continue it or choose another --output")
    summary = train(cfg, output, resume=args.resume)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if "eval_after" in summary:
        before, after = summary.get("eval_before", {}), summary["eval_after"]
        for key in after:
            print(f"{key:>12}: {before.get(key, float('nan')):+.4f} -> {after[key]:+.4f}")
    print(f"done: {summary['steps']} updates in {summary['seconds']:.1f}s; weights in {summary['final']}")
    return 0
