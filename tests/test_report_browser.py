"""RUN/report.html in a real headless browser (Debian's chromium + chromium-driver, driven by
selenium; nothing is downloaded: the driver and browser paths are given and SE_OFFLINE is set).

A tiny run with three guard steps (0, 2, 4) is opened from disk: every image must load, the SVG
charts must draw lines with extent, the decisions table must have a row per guard step, and the
browser console must stay free of errors. The same checks are run on a deliberately broken copy
of the page to show that they can fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


import pytest
from PIL import Image

from browser import chromium, needs_browser, open_page
from srpo.cli import main as cli
from srpo.config import load_config
from srpo.trainer import train

pytestmark = needs_browser

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
QUICK = ["train.max_steps=4", "guard.every=2", "rollout.steps=2", "data.eval_steps=2", "guard.prompts=2",
         "guard.best_when=[]", "log.checkpoint_every=0", "log.tensorboard=false", "log.progress=false"]
GUARD_STEPS = [0, 2, 4]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    train(load_config(CONFIG, QUICK), out)
    return out


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    yield from chromium(tmp_path_factory)


_open = open_page


def _broken_images(driver) -> list[str]:
    """src of every <img> that did not load (complete, with a decoded width)."""
    imgs = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
    assert imgs, "no <img> on the page"
    return [src for src, complete, width in imgs if not (complete and width > 0)]


def _charts(driver) -> list[list[float]]:
    """Per svg.chart, the rendered bounding-box widths of its polylines."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart')).map("
        "s => Array.from(s.querySelectorAll('polyline')).map(p => p.getBBox().width));")


def _severe(log: list[dict]) -> list[str]:
    return [e["message"] for e in log if e.get("level") == "SEVERE"]


def test_report_renders_in_a_real_browser(run, driver):
    page = run / "report.html"
    log = _open(driver, page)
    assert driver.title == f"srpo run report: {run.name}"

    # images: all load, and the browser decoded them at the PNGs' own size
    assert _broken_images(driver) == []
    imgs = driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]);")
    assert {src for src, _, _ in imgs} == {"samples/before.png", "samples/step-000002.png", "samples/after.png"}
    assert len(imgs) == 2 * (len(GUARD_STEPS) - 1)  # base beside each later guard step
    for src, w, h in imgs:
        assert (w, h) == Image.open(run / src).size, src

    # charts: at least 3 (training, held-out reward, drift, hack index, diversity), every line drawn
    charts = _charts(driver)
    drawn = [c for c in charts if c and all(w > 0 for w in c)]
    assert len(drawn) >= 3, charts
    assert all(all(w > 0 for w in c) for c in charts), charts  # no chart with a collapsed line
    assert sum(len(c) for c in charts) >= 3 + 6  # reward, loss, 2 held-out, 6 drift statistics at least
    boxes = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart')).map(s => s.getBoundingClientRect().width);")
    assert all(w > 0 for w in boxes)

    # the decisions table: one row per guard step, the base and the best marked
    rows = driver.execute_script(
        "const t = document.querySelector('table'); return Array.from(t.rows).slice(1).map("
        "r => Array.from(r.cells).map(c => c.textContent));")
    assert [int(r[0]) for r in rows] == GUARD_STEPS
    summary = json.loads((run / "summary.json").read_text())["guard"]
    decisions = {int(r[0]): r[-1] for r in rows}
    assert "base" in decisions[0]
    assert "best" in decisions[summary["best_step"]]
    assert sum("best" in d for d in decisions.values()) == 1

    assert _severe(log) == [], log


def test_the_checks_catch_a_broken_page(run, driver):
    """A copy of the page (beside it, so its relative paths resolve) with one image pointing at
    a missing file and one chart line collapsed to a point: each check must fail on it."""
    html = (run / "report.html").read_text()
    assert html.count('src="samples/step-000002.png"') == 1
    broken = html.replace('src="samples/step-000002.png"', 'src="samples/missing.png"')
    start = broken.index('<polyline class="series"')
    end = broken.index("/>", start)
    broken = broken[:start] + '<polyline class="series" fill="none" stroke="#000" points="40,40"' + broken[end:]
    page = run / "report-broken.html"
    page.write_text(broken)
    try:
        log = _open(driver, page)
        assert _broken_images(driver) == ["samples/missing.png"]
        assert any(w == 0 for c in _charts(driver) for w in c)
        assert any("missing.png" in m for m in _severe(log)), log  # the console check sees it too
    finally:
        page.unlink()


def test_srpo_report_rewrites_the_same_page(run, tmp_path):
    copy = tmp_path / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "checkpoints", "best"))
    (copy / "report.html").unlink()
    assert cli(["report", str(copy)]) == 0
    assert (copy / "report.html").read_text() == (run / "report.html").read_text()
