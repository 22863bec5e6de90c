"""The files of ``srpo eval`` in ``--output``:

- ``eval.json``: settings, checkpoints, rewards, the table (per reward and checkpoint: mean, 95 %
  bootstrap interval over prompts, paired win rate against the base) and every image's score;
- ``eval.csv``: the table, one row per reward and checkpoint; ``scores.csv``: one row per image;
- ``eval.md``: the table in markdown, checkpoints as rows, rewards as columns;
- ``eval.html``: the table beside the image grids (sibling PNGs in ``images/``), then every
  prompt's images per checkpoint with their scores; no scripts, no network. Videos play there as
  animated GIFs (``grid.gif`` and one per video beside the first frames' PNGs).

Each is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from . import stats


def results(scores: dict[str, dict[str, list[float]]], seeds: int, baseline: str) -> dict:
    """``{reward: {checkpoint: stats.summary}}`` of per-image scores (prompt-major, seeds inner)."""
    out = {}
    for reward, per_ckpt in scores.items():
        base = stats.per_prompt(per_ckpt[baseline], seeds)
        out[reward] = {c: stats.summary(stats.per_prompt(v, seeds), None if c == baseline else base)
                       for c, v in per_ckpt.items()}
    return out


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _cell(r: dict, digits: int = 4) -> str:
    lo, hi = r["ci95"]
    win = "" if r["win_rate"] is None else f" · win {100 * r['win_rate']:.0f} %"
    return f"{r['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]{win}"


def markdown(data: dict) -> str:
    rewards, ckpts = list(data["results"]), [c["label"] for c in data["checkpoints"]]
    s = data["settings"]
    lines = [f"# srpo eval: {len(ckpts)} checkpoints x {len(rewards)} rewards", "",
             f"{s['prompts']} prompts x {s['seeds']} seeds, {s['steps']} steps, guidance {s['guidance']:g}, "
             f"{s['height']}x{s['width']}, schedule {s['schedule']}. Each cell: mean [95 % bootstrap interval over "
             f"prompts, {s['resamples']} resamples, seed {s['bootstrap_seed']}] · paired win rate against "
             f"`{data['baseline']}` (ties count one half).", "",
             "| checkpoint | " + " | ".join(rewards) + " |", "|---" * (len(rewards) + 1) + "|"]
    for c in ckpts:
        lines.append(f"| {c} | " + " | ".join(_cell(data["results"][r][c]) for r in rewards) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(data: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["reward", "checkpoint", "mean", "ci95_low", "ci95_high", "win_rate", "n_prompts"])
    for reward, per in data["results"].items():
        for c, r in per.items():
            w.writerow([reward, c, f"{r['mean']:.6f}", f"{r['ci95'][0]:.6f}", f"{r['ci95'][1]:.6f}",
                        "" if r["win_rate"] is None else f"{r['win_rate']:.6f}", r["n_prompts"]])
    return buf.getvalue()


def scores_csv(data: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    rewards, seeds = list(data["scores"]), data["settings"]["seeds"]
    w.writerow(["checkpoint", "prompt_index", "seed", "prompt", "image", *rewards])
    for c in data["checkpoints"]:
        for i, image in enumerate(c["images"]):
            p = i // seeds
            w.writerow([c["label"], p, i % seeds, data["prompts"][p], image,
                        *(f"{data['scores'][r][c['label']][i]:.6f}" for r in rewards)])
    return buf.getvalue()


def page(data: dict, out: Path) -> str:
    rewards, ckpts, seeds = list(data["results"]), data["checkpoints"], data["settings"]["seeds"]
    esc = html.escape
    head = "".join(f"<th>{esc(r)}</th>" for r in rewards)
    rows = "".join(f"<tr><th>{esc(c['label'])}</th>" + "".join(
        f"<td>{esc(_cell(data['results'][r][c['label']]))}</td>" for r in rewards) + "</tr>" for c in ckpts)
    def grid(c):
        if "videos" in c:
            return (f'<figure class="grid"><img class="preview" src="{esc(c["dir"])}/grid.gif" '
                    f'alt="{esc(c["label"])} (animated)"><figcaption>{esc(c["label"])}</figcaption></figure>')
        return (f'<figure class="grid"><img src="{esc(c["dir"])}/grid.png" alt="{esc(c["label"])}">'
                f"<figcaption>{esc(c['label'])}</figcaption></figure>")

    grids = "".join(grid(c) for c in ckpts)
    per_prompt = []
    for p, prompt in enumerate(data["prompts"]):
        cells = []
        for c in ckpts:
            imgs = []
            for s in range(seeds):
                i = p * seeds + s
                tip = ", ".join(f"{r} {data['scores'][r][c['label']][i]:.4f}" for r in rewards)
                if "videos" in c:
                    imgs.append(f'<img class="preview" src="{esc(c["dir"])}/{esc(c["videos"][i])}" '
                                f'alt="{esc(c["label"])} seed {s} (animated)" title="{esc(tip)}">')
                else:
                    imgs.append(f'<img src="{esc(c["dir"])}/{esc(c["images"][i])}" alt="{esc(c["label"])} seed {s}" '
                                f'title="{esc(tip)}">')
            cells.append(f"<td>{''.join(imgs)}</td>")
        per_prompt.append(f"<tr><th>{esc(prompt)}</th>{''.join(cells)}</tr>")
    s = data["settings"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>srpo eval: {esc(out.name)}</title>
<style>body{{font-family:sans-serif;margin:24px}} .side{{display:flex;gap:24px;align-items:flex-start}}
.grids{{display:flex;flex-wrap:wrap;gap:8px;flex:1;min-width:260px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}}
figure{{display:inline-block;margin:4px}} .grid img{{image-rendering:pixelated;width:240px}}
.prompts img{{image-rendering:pixelated;width:96px;margin:1px}}</style></head>
<body><h1>srpo eval: {esc(out.name)}</h1>
<p>{s['prompts']} prompts &times; {s['seeds']} seeds &middot; {s['steps']} steps &middot; guidance {s['guidance']:g}
&middot; {s['height']}&times;{s['width']} &middot; schedule {esc(s['schedule'])} &middot; mean [95 % bootstrap
interval over prompts] &middot; paired win rate against <code>{esc(data['baseline'])}</code></p>
<div class="side"><table id="results"><tr><th>checkpoint</th>{head}</tr>{rows}</table>
<div class="grids">{grids}</div></div>
<h2>Every prompt</h2><table class="prompts"><tr><th>prompt</th>{''.join(f"<th>{esc(c['label'])}</th>" for c in ckpts)}</tr>
{''.join(per_prompt)}</table>
</body></html>
"""


def write_all(data: dict, out: Path) -> list[Path]:
    return [_write(out / "eval.json", json.dumps(data, indent=1) + "\n"),
            _write(out / "eval.csv", summary_csv(data)), _write(out / "scores.csv", scores_csv(data)),
            _write(out / "eval.md", markdown(data)), _write(out / "eval.html", page(data, out))]
