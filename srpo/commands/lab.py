"""srpo lab [--output DIR] [--quick] [--no-control] [--config YAML] [--set k=v ...]
srpo lab build [--out DIR] [--stage NAME ...] [--quick]"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("lab", help="run SRPO on the embedded lab world and judge it (or: lab build)",
                       description="Without an action: fine-tune the shipped lab model with SRPO on the CPU, "
                                   "judge base and result on held-out prompts, write summary.json, grids and "
                                   "curves. `srpo lab build` retrains every lab weight from seeds.")
    p.add_argument("action", nargs="?", choices=["run", "build"], default="run",
                   help="run (default): the experiment; build: regenerate the lab weights")
    p.add_argument("--output", "-o", default="runs/lab", help="run: output folder (default runs/lab)")
    p.add_argument("--quick", action="store_true",
                   help="run: a smoke run of the whole pipeline (a few updates); build: tiny stages for testing")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="run: skip the control run that maximises the absolute reward")
    p.add_argument("--config", default=None, help="run: lab config (default configs/lab.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="run: override a config value (repeatable)")
    p.add_argument("--out", default=None, help="build: weights folder (default: the package's srpo/lab/weights)")
    p.add_argument("--stage", action="append", default=None, choices=["vae", "judge", "base", "reward"],
                   help="build: only these stages (repeatable; default all, in order)")


def run(args) -> int:
    if args.action == "build":
        from ..lab.build import STAGES, WEIGHTS, build

        out = Path(args.out) if args.out else WEIGHTS
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        info = build(out, stages=args.stage or STAGES, quick=args.quick)
        for stage, row in info.items():
            print(f"{stage:>7}: {row['seconds']:8.1f}s  ({row['steps']} steps)")
        print(f"lab weights written to {out}")
        return 0

    from ..lab.run import run_lab, table

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a folder")
    summary = run_lab(output, quick=args.quick, control=args.control, config=args.config,
                      overrides=args.overrides)
    print(table(summary))
    print(f"done in {summary['seconds']:.0f}s: {output / 'summary.json'}, before.png, after.png, curves.png")
    return 0
