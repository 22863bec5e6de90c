"""``RUN/report.html``: one self-contained page of a run (no scripts, no network): the guard's
decisions, curves as inline SVG (training reward and loss per update; held-out reward, judges,
drift statistics and hack index per guard step), the base and current image grids of every
guard step side by side (files beside the page, in ``samples/``), and the resolved config.

A video run (its guard measures the temporal statistics) shows animated previews instead: each
``samples/<grid>.png`` (a row of frames per video) becomes ``samples/<grid>.gif``, its videos
played together, one held-out prompt's seeds to a row, each scaled to fit 256 pixels."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2")
W, H, PAD, LEGEND = 520, 220, 36, 110  # LEGEND: room for the series names on the right


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]], markers: dict[float, str] | None = None) -> str:
    """A line chart as inline SVG: one polyline per series, axes with min / max labels."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

    def sx(x):
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD - LEGEND)

    def sy(y):
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    out = [f'<svg class="chart" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="{html.escape(title)}">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD - LEGEND}" y2="{H - PAD}" stroke="#888"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#888"/>',
           f'<text x="{PAD}" y="{H - PAD + 14}" font-size="10">{x0:g}</text>',
           f'<text x="{W - PAD - LEGEND}" y="{H - PAD + 14}" font-size="10" text-anchor="end">{x1:g}</text>',
           f'<text x="{PAD - 4}" y="{H - PAD}" font-size="10" text-anchor="end">{y0:.3g}</text>',
           f'<text x="{PAD - 4}" y="{PAD + 4}" font-size="10" text-anchor="end">{y1:.3g}</text>']
    for x, label in (markers or {}).items():
        out.append(f'<line x1="{sx(x):.1f}" y1="{PAD}" x2="{sx(x):.1f}" y2="{H - PAD}" stroke="#999" '
                   f'stroke-dasharray="3,3"><title>{html.escape(label)}</title></line>')
    for i, (name, s) in enumerate(series.items()):
        s = [(x, y) for x, y in s if math.isfinite(y)]
        if not s:
            continue
        c = COLOURS[i % len(COLOURS)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f'<polyline class="series" fill="none" stroke="{c}" stroke-width="1.6" points="{line}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{c}"/>' for x, y in s]
        out.append(f'<text x="{W - PAD - LEGEND + 8}" y="{PAD + 12 * i}" font-size="10" fill="{c}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]


def _video_size(run: Path, guard_rows: list[dict]) -> tuple[int, int, int | None] | None:
    """A video run's frame height, width and guard seeds (from config.yaml); None for images."""
    if not any("guard/drift:motion" in r for r in guard_rows):  # measured exactly for video runs
        return None
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    r, g = (cfg or {}).get("rollout") or {}, (cfg or {}).get("guard") or {}
    if not r.get("height") or not r.get("width"):
        return None
    return int(r["height"]), int(r["width"]), g.get("seeds")


def preview(run: Path, name: str, size: tuple[int, int, int | None]) -> str | None:
    """``samples/<name>.png`` of videos as an animated ``samples/<name>.gif`` (rewritten only when
    older than the PNG); its file name, None when there is no PNG."""
    from ..video import read_video_grid, write_preview_gif

    png = run / "samples" / name
    gif = png.with_suffix(".gif")
    if not png.is_file():
        return None
    if not gif.is_file() or gif.stat().st_mtime < png.stat().st_mtime:
        h, w, seeds = size
        write_preview_gif(read_video_grid(png, h, w), gif, nrow=seeds)
    return gif.name


def build(run: str | Path) -> str:
    """The page's HTML for a run folder."""
    run = Path(run)
    rows = _rows(run)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else ""
    guard = summary.get("guard", {})
    guard_rows = [r for r in rows if any(k.startswith("guard/") for k in r)]
    before = run / "eval_before.json"
    if before.is_file() and guard:  # the base evaluation (step 0) lives beside metrics.jsonl
        guard_rows.insert(0, {"step": 0, **{f"guard/{k}": v for k, v in json.loads(before.read_text()).items()}})
    markers = {}
    if guard.get("best_step"):
        markers[guard["best_step"]] = f"best: update {guard['best_step']}"
    if guard.get("stopped_at"):
        markers[guard["stopped_at"]] = f"stopped: {guard.get('rule')}"

    charts = [svg_chart("training reward and loss (per update)",
                        {"reward": _series(rows, "reward"), "loss": _series(rows, "loss")}, markers)]
    keys = sorted({k for r in guard_rows for k in r if k.startswith("guard/")
                   and isinstance(r[k], (int, float)) and k != "guard/diversity_abs"})
    held = {k[6:]: _series(guard_rows, k) for k in keys if k in ("guard/reward", "guard/srp_reward")}
    judges = {k[6:]: _series(guard_rows, k) for k in keys if k.startswith("guard/judge:")}
    drift = {k[12:]: _series(guard_rows, k) for k in keys if k.startswith("guard/drift:")}
    for title, series in (("held-out reward (guard steps)", held), ("held-out judges", judges),
                          ("drift of image statistics (base spreads)", drift),
                          ("hack index", {"hack_index": _series(guard_rows, "guard/hack_index")}),
                          ("diversity (relative to the base)", {"diversity": _series(guard_rows, "guard/diversity")})):
        if any(series.values()):
            charts.append(svg_chart(title, series, markers))

    metric = guard.get("best_metric")
    table = ["<table><tr><th>update</th><th>hack index</th>"
             + (f"<th>{html.escape(metric)}</th>" if metric else "") + "<th>decision</th></tr>"]
    for r in guard_rows:
        step = r["step"]
        decision = []
        if step == guard.get("best_step"):
            decision.append("best")
        if r.get("guard/stop"):
            decision.append(f"stop: {html.escape(str(r['guard/stop']))}")
        if step == 0:
            decision.append("base")
        value = r.get(f"guard/{metric}") if metric else None
        table.append(f"<tr><td>{step}</td><td>{r.get('guard/hack_index', float('nan')):.3f}</td>"
                     + (f"<td>{value:.4f}</td>" if isinstance(value, (int, float)) else ("<td></td>" if metric else ""))
                     + f"<td>{', '.join(decision)}</td></tr>")
    table.append("</table>")

    video = _video_size(run, guard_rows)
    grids = []
    for r in guard_rows:
        step = r["step"]
        name = "before.png" if step == 0 else ("after.png" if (run / "samples" / "after.png").is_file()
                                                and step == summary.get("steps") else f"step-{step:06d}.png")
        if step == 0 or not (run / "samples" / name).is_file():
            continue
        if video is not None:
            base, now = preview(run, "before.png", video), preview(run, name, video)
            if base is None:
                continue
            grids.append(f'<div class="pair"><h3>update {step}</h3><figure><img class="preview" src="samples/{base}" '
                         f'alt="base (animated)"><figcaption>base &middot; <a href="samples/before.png">frames</a>'
                         f'</figcaption></figure><figure><img class="preview" src="samples/{now}" '
                         f'alt="update {step} (animated)"><figcaption>update {step} &middot; '
                         f'<a href="samples/{name}">frames</a></figcaption></figure></div>')
            continue
        grids.append(f'<div class="pair"><h3>update {step}</h3><figure><img src="samples/before.png" alt="base">'
                     f'<figcaption>base</figcaption></figure><figure><img src="samples/{name}" alt="update {step}">'
                     f'<figcaption>update {step}</figcaption></figure></div>')

    if guard.get("stopped_at"):
        verdict = f"stopped after update {guard['stopped_at']}: <code>{html.escape(str(guard['rule']))}</code>"
    elif guard:
        verdict = f"ran all {summary.get('steps')} updates; no stop rule fired"
    else:
        verdict = "no guard in this run"
    best = (f"best: update {guard['best_step']} ({html.escape(str(metric))} {guard['best_value']:.4f}), kept in "
            f"<code>best/</code>" if guard.get("best_step") else "no best/ kept")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>srpo run report: {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1400px}} .charts{{display:flex;flex-wrap:wrap;gap:12px}}
.pair{{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}} figure{{display:inline-block;margin:4px}}
img{{image-rendering:pixelated;width:300px}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px}}
pre{{background:#f6f6f6;padding:8px;max-height:400px;overflow:auto}}</style></head>
<body><h1>srpo run: {html.escape(run.name)}</h1>
<p>{summary.get('algorithm', '')} &middot; {summary.get('steps', '?')} updates &middot; {verdict} &middot; {best}</p>
<h2>Curves</h2><div class="charts">{''.join(charts)}</div>
<h2>Guard decisions</h2>{''.join(table)}
<h2>{'Videos' if video else 'Images'}: base and current, same prompts and seeds</h2>{''.join(grids) or f"<p>no guard {'videos' if video else 'images'}</p>"}
<h2>Config</h2><pre>{html.escape(config)}</pre>
</body></html>
"""


def write(run: str | Path) -> Path:
    run = Path(run)
    path = run / "report.html"
    tmp = run / ".report.html.tmp"
    tmp.write_text(build(run), encoding="utf-8")
    tmp.replace(path)
    return path
