"""``srpo plan`` per GPU for every image family's starter config at its flagship's dimensions, the
table BENCHMARKS.md keeps, and issue 19's targets checked against it.

    python benchmarks/plan_targets.py                 # the table (markdown) and the targets, seconds
    python benchmarks/plan_targets.py --out plan.json

Each config is what ``srpo init FAMILY --reward hps --lora|--full`` writes (720 x 720, batch 1,
bf16 autocast, checkpointing, text encoders released and, with a folder, streamed), estimated
as ``srpo plan CONFIG --gpus N`` does (:func:`srpo.plan.estimate_for`, CUDA). Exit 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without installing

FAMILIES = ("flux", "flux2", "flux2_klein", "qwen_image", "sd3", "z_image")
# (column, lora, strategy, gpus, config overrides)
LAYOUTS = (("LoRA, 1 GPU", True, "none", 1, {}), ("LoRA, FSDP x8", True, "fsdp", 8, {}),
           ("full, FSDP x8", False, "fsdp", 8, {}), ("full, FSDP x32", False, "fsdp", 32, {}),
           ("LoRA, 1 GPU, NF4 base", True, "none", 1, {"quantize": "nf4"}))
# issue 19, item 6: (family, column, GiB at most)
TARGETS = (("flux2", "LoRA, FSDP x8", 40), ("flux2", "full, FSDP x8", 100), ("flux", "full, FSDP x8", 38),
           ("qwen_image", "full, FSDP x8", 56), ("flux", "LoRA, 1 GPU, NF4 base", 22))


def plans() -> dict[str, dict[str, float]]:
    """GiB per GPU by family and layout."""
    from srpo import plan
    from srpo.commands import init
    from srpo.config import load_config

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            row = out.setdefault(family, {})
            for column, lora, strategy, gpus, model in LAYOUTS:
                text, _ = init.build(family, "hps", lora, output=str(Path(tmp) / "c.yaml"))
                path = Path(tmp) / f"{family}-{lora}.yaml"
                path.write_text(text)
                cfg = load_config(path)
                for key, value in model.items():
                    setattr(cfg.model, key, value)
                sizes = plan.model_sizes(cfg)
                row[column] = plan.estimate_for(cfg, sizes, gpus, strategy, lora)["total"] / plan.GiB
    return out


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    table = plans()
    columns = [c for c, *_ in LAYOUTS]
    print("| family | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for family, row in table.items():
        print(f"| {family} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")
    missed = 0
    print()
    for family, column, limit in TARGETS:
        got = table[family][column]
        missed += got > limit
        print(f"{family} {column}: {got:.1f} GiB (target <= {limit}): {'met' if got <= limit else 'MISSED'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"plans_gib": table, "targets": TARGETS}, indent=2) + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
