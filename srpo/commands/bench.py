"""srpo bench [--quick] [--output DIR] [--parts a,b,c,d,e] [--config YAML] [--compile MODE] [--seeds N] [--set k=v ...]"""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark SRPO against ReFL, DRaFT and GRPO on the lab world",
                       description="(a) time / FLOPs to a judge target, (b) time and memory per update against "
                                   "rollout steps and DRaFT's K, (c) SRPO's update against its parts, (d) rollout "
                                   "speed against each family's diffusers pipeline, (e) hack_index at equal reward gain "
                                   "with SRPO's ablations. Prints tables and writes DIR/bench.json.")
    p.add_argument("--output", "-o", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--quick", action="store_true", help="small budgets: a smoke run of every part")
    p.add_argument("--parts", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    p.add_argument("--config", default=None,
                   help="config (default configs/lab.yaml); parts a and e need the lab world's judge")
    p.add_argument("--compile", default="model", choices=("none", "blocks", "model"),
                   help="(d): the train.compile mode measured against eager and the pipelines (default model; "
                        "none: eager only)")
    p.add_argument("--seeds", type=int, default=1,
                   help="(e): train every run with this many seeds of the run noise and prompt order (train.seed, "
                        "train.seed + 1, ...) and report each hack_index as mean and spread (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every measurement (repeatable)")


def run(args) -> int:
    from ..bench import PARTS, run_bench

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise UserError(f"--parts {args.parts!r}: choose from {','.join(PARTS)}")
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give 1 or more")
    run_bench(args.output, quick=args.quick, parts=parts, config=args.config, overrides=args.overrides,
              compile=args.compile, seeds=args.seeds)
    print(f"wrote {args.output}/bench.json")
    return 0
