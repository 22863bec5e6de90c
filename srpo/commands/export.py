"""srpo export RUN_DIR --output PATH [--format diffusers|single-file] [--dtype ...]"""

from __future__ import annotations

from ..errors import UserError

DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained run's weights (LoRA merged) for other tools")
    p.add_argument("run", help="run folder written by srpo train")
    p.add_argument("--output", "-o", required=True,
                   help="diffusers: a new folder; single-file: a .safetensors file path")
    p.add_argument("--format", default="diffusers", choices=["diffusers", "single-file"],
                   help="diffusers: a whole pipeline folder of the model's family; single-file: the "
                        "transformer alone in the family's original layout (ComfyUI, diffusers from_single_file)")
    p.add_argument("--dtype", default="keep", choices=list(DTYPES),
                   help="cast the transformer weights (keep: as trained)")


def run(args) -> int:
    import torch

    from ..export import export_run

    if args.format == "single-file" and not str(args.output).endswith(".safetensors"):
        raise UserError(f"--output {args.output} must end in .safetensors for --format single-file")
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    out = export_run(args.run, args.output, args.format, dtype)
    print(f"wrote {args.format} export to {out}")
    return 0
