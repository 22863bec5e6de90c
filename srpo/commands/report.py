"""srpo report RUN: (re)write RUN/report.html from the run folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write RUN/report.html: curves, guard decisions, base vs current images")
    p.add_argument("run", help="run folder written by srpo train")


def run(args) -> int:
    from ..guard.report import write

    run_dir = Path(args.run)
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir} is not a run folder (no metrics.jsonl): give a folder written by srpo train")
    print(f"wrote {write(run_dir)}")
    return 0
