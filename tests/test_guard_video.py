"""The guard on video runs: temporal statistics (frame difference, flicker, motion) against
hand-computed values on constructed videos, video statistics as the per-frame image statistics
averaged, drift and hack index over all of them, the report's animated previews (decoded in
headless chromium), and a tiny-wan training run with the guard on.

Every expected number is computed by hand from the definition, not by calling the function under
test a second time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from browser import chromium, needs_browser, open_page, preview_images
from srpo.config import load_config
from srpo.errors import UserError
from srpo.guard.monitor import Guard
from srpo.guard.stats import STATS, TEMPORAL_STATS, VIDEO_STATS, drift, hack_index, image_stats, temporal_stats, video_stats
from srpo.runlog import save_grid
from srpo.trainer import train
from srpo.video import gif_frames, read_video_grid, write_preview_gif

ROOT = Path(__file__).resolve().parents[1]
WAN = ROOT / "configs" / "tiny-wan.yaml"
TINY = ROOT / "configs" / "tiny.yaml"
QUICK = ["guard.enabled=true", "train.max_steps=4", "guard.every=2", "guard.prompts=2", "rollout.steps=2",
         "data.eval_steps=2", "guard.stop_when=[]", "guard.best_when=[]", "log.checkpoint_every=0",
         "log.tensorboard=false", "log.progress=false"]
GUARD_STEPS = [0, 2, 4]


def _grey_video(planes) -> torch.Tensor:
    """One grey video [1, F, 3, H, W] whose frames are the 2-d arrays ``planes`` (luma = value:
    the Rec. 601 weights sum to 1)."""
    a = np.stack([np.asarray(p, dtype=np.float64) for p in planes])
    return torch.tensor(np.repeat(a[:, None], 3, axis=1)[None], dtype=torch.float32)


def _t(videos) -> dict[str, float]:
    return {k: float(v[0]) for k, v in temporal_stats(videos).items()}


# --------------------------------------------------------------------------- temporal statistics

def test_a_static_video_has_no_temporal_change():
    rng = np.random.default_rng(0)
    frame = rng.uniform(0.1, 0.9, (12, 12))
    s = _t(_grey_video([frame] * 5))
    assert s == {"frame_difference": 0.0, "flicker": 0.0, "motion": 0.0}


def test_one_frame_is_no_change():
    assert _t(_grey_video([np.full((6, 6), 0.5)])) == {"frame_difference": 0.0, "flicker": 0.0, "motion": 0.0}


def test_flat_frames_alternating_flicker_fully_and_do_not_move():
    """0.2, 0.6, 0.2, 0.6: every step changes by 0.4; each pixel's mean-removed series is +-0.2 at
    0.5 cycles/frame (all its energy above 0.25); no spatial gradient, so no motion."""
    s = _t(_grey_video([np.full((8, 8), v) for v in (0.2, 0.6, 0.2, 0.6)]))
    assert s["frame_difference"] == pytest.approx(0.4, abs=1e-6)
    assert s["flicker"] == pytest.approx(1.0, abs=1e-6)
    assert s["motion"] == 0.0


def test_flicker_of_a_steady_fade_by_hand():
    """Flat frames 0.2, 0.3, 0.4, 0.5: mean-removed series (-1.5, -0.5, 0.5, 1.5) x 0.1; its DFT
    energies at k = 0..3 are 0, 8, 4, 8 (x 0.01), and only k = 2 (0.5 cycles/frame) is above 0.25:
    flicker 4 / 20 = 0.2; every step changes by 0.1."""
    s = _t(_grey_video([np.full((8, 8), v) for v in (0.2, 0.3, 0.4, 0.5)]))
    assert s["flicker"] == pytest.approx(0.2, abs=1e-6)
    assert s["frame_difference"] == pytest.approx(0.1, abs=1e-6)
    assert s["motion"] == 0.0


@pytest.mark.parametrize("d", [1, 2])
def test_a_ramp_shifted_d_pixels_per_frame_moves_d(d):
    """L_t(x, y) = 0.3 + a (x - d t), inside [0, 1]: the central-difference gradient is a, the
    frame difference -a d everywhere: motion d, frame difference a d."""
    a, w = 0.03, 16
    x = np.arange(w)[None, :].repeat(10, 0)
    frames = [0.3 + a * (x - d * t) for t in range(5)]
    assert min(f.min() for f in frames) >= 0 and max(f.max() for f in frames) <= 1
    s = _t(_grey_video(frames))
    assert s["motion"] == pytest.approx(d, rel=1e-4)
    assert s["frame_difference"] == pytest.approx(a * d, rel=1e-4)


def test_a_diagonal_shift_moves_its_length():
    """L = 0.1 + a (x + y) shifted by (d, d) per frame: normal flow |a d + a d| / (a sqrt 2) = sqrt(2) d."""
    a, d, n = 0.02, 1, 14
    y, x = np.indices((n, n))
    frames = [0.1 + a * ((x - d * t) + (y - d * t)) + 0.1 for t in range(5)]
    assert min(f.min() for f in frames) >= 0 and max(f.max() for f in frames) <= 1
    assert _t(_grey_video(frames))["motion"] == pytest.approx(math.sqrt(2) * d, rel=1e-4)


def test_video_stats_average_the_frames_image_statistics():
    """Frames of constant colours: saturation (max - min) / max and brightness (luma) per frame,
    averaged over the video's frames; contrast and sharpness 0; temporal statistics beside them."""
    colours = [(0.8, 0.4, 0.2), (0.2, 0.4, 0.8), (0.5, 0.5, 0.5)]
    video = torch.tensor(colours, dtype=torch.float32).view(1, 3, 3, 1, 1).expand(1, 3, 3, 8, 8).contiguous()
    s = video_stats(video)
    assert list(s) == list(VIDEO_STATS)
    luma = np.array([0.299, 0.587, 0.114])
    assert float(s["saturation"][0]) == pytest.approx(np.mean([(max(c) - min(c)) / max(c) for c in colours]), abs=1e-6)
    assert float(s["brightness"][0]) == pytest.approx(np.mean([luma @ np.array(c) for c in colours]), abs=1e-6)
    assert float(s["contrast"][0]) == pytest.approx(0.0, abs=1e-6)
    assert float(s["sharpness"][0]) == pytest.approx(0.0, abs=1e-6)
    steps = np.abs(np.diff([luma @ np.array(c) for c in colours]))
    assert float(s["frame_difference"][0]) == pytest.approx(steps.mean(), abs=1e-6)


def test_video_stats_are_per_video():
    a = _grey_video([np.full((6, 6), v) for v in (0.2, 0.6, 0.2, 0.6)])
    b = _grey_video([np.full((6, 6), 0.5)] * 4)
    s = video_stats(torch.cat([a, b]), keys=("frame_difference", "brightness"))
    assert list(s) == ["frame_difference", "brightness"]
    assert s["frame_difference"].tolist() == pytest.approx([0.4, 0.0], abs=1e-6)
    assert s["brightness"].tolist() == pytest.approx([0.4, 0.5], abs=1e-6)


def test_temporal_drift_and_the_hack_index_over_every_statistic():
    """Base: two flat alternating videos with steps 0.1 and 0.3 (frame difference mean 0.2,
    sample std 0.1 sqrt 2); now: steps 0.5 and 0.5: drift (0.5 - 0.2) / (0.1 sqrt 2)."""
    def alt(step):
        return _grey_video([np.full((6, 6), 0.2 + step * (t % 2)) for t in range(4)])

    base = video_stats(torch.cat([alt(0.1), alt(0.3)]))
    now = video_stats(torch.cat([alt(0.5), alt(0.5)]))
    d = drift(now, base)
    assert set(d) == set(VIDEO_STATS)
    assert d["frame_difference"] == pytest.approx(0.3 / (0.1 * math.sqrt(2)), rel=1e-4)
    assert d["motion"] == 0.0 and d["flicker"] == pytest.approx(0.0, abs=1e-3)  # fully flickering both times
    assert hack_index(now, base) == max(d.values())
    assert hack_index(now, base, keys=TEMPORAL_STATS) == pytest.approx(d["frame_difference"])


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"videos \[B, F, 3, H, W\], got \[2, 3, 8, 8\]"):
        temporal_stats(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="got"):
        video_stats(torch.zeros(1, 4, 1, 8, 8))


def test_images_keep_their_statistics_and_names():
    """An image run's guard: the six image statistics, no temporal ones; a wan run adds them."""
    reward_fn = type("R", (), {"srp": None, "reward": object(), "frames": 4})()
    img = Guard(load_config(TINY, ["guard.stop_when=[]"]), reward_fn, ["a"], "cpu")
    vid = Guard(load_config(WAN, ["guard.stop_when=[]", 'guard.best_when=["drift:flicker < 2"]']), reward_fn, ["a"], "cpu")
    assert not img.video and vid.video
    assert [n for n in img.metric_names() if n.startswith("drift:")] == [f"drift:{k}" for k in STATS]
    assert [n for n in vid.metric_names() if n.startswith("drift:")] == [f"drift:{k}" for k in VIDEO_STATS]
    with pytest.raises(UserError, match="drift:motion"):  # an image run does not measure motion
        Guard(load_config(TINY, ['guard.stop_when=["drift:motion > 1"]']), reward_fn, ["a"], "cpu")
    assert list(image_stats(torch.rand(2, 3, 8, 8))) == list(STATS)


# --------------------------------------------------------------------------- previews

def test_a_video_grid_png_gives_back_its_frames_exactly(tmp_path):
    videos = torch.rand(3, 5, 3, 12, 10)
    save_grid(videos, tmp_path / "g.png")
    back = read_video_grid(tmp_path / "g.png", 12, 10)
    assert back.shape == (3, 5, 3, 12, 10)
    assert torch.equal(back, (videos * 255).round() / 255)  # the PNG's 8-bit frames
    with pytest.raises(UserError, match="is not a grid of 11x12 video frames"):
        read_video_grid(tmp_path / "g.png", 12, 11)


def test_preview_gif_plays_every_frame_and_fits(tmp_path):
    videos = torch.rand(2, 4, 3, 40, 20)
    path = write_preview_gif(videos, tmp_path / "p.gif", nrow=2, pad=0, max_side=20)
    assert gif_frames(path) == 4
    assert Image.open(path).size == (2 * 10, 20)  # 40x20 scaled to fit 20: 20x10 each, side by side
    with pytest.raises(UserError, match="videos to preview"):
        write_preview_gif(torch.rand(4, 3, 8, 8), tmp_path / "q.gif")


# --------------------------------------------------------------------------- a tiny-wan run

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guard_video") / "run"
    train(load_config(WAN, QUICK), out)
    return out


def _rows(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_wan_run_with_the_guard_measures_the_temporal_statistics(run):
    before = json.loads((run / "eval_before.json").read_text())
    assert {f"drift:{k}" for k in VIDEO_STATS} <= set(before)
    assert before["hack_index"] == 0.0 and all(before[f"drift:{k}"] == 0.0 for k in VIDEO_STATS)
    guarded = [r for r in _rows(run) if "guard/hack_index" in r]
    assert [r["step"] for r in guarded] == GUARD_STEPS[1:]
    for r in guarded:
        drifts = [r[f"guard/drift:{k}"] for k in VIDEO_STATS]
        assert all(math.isfinite(v) and v >= 0 for v in drifts)
        assert r["guard/hack_index"] == max(drifts)  # the temporal statistics are in the index
    assert any(r[f"guard/drift:{k}"] > 0 for r in guarded for k in TEMPORAL_STATS)  # the weights moved
    state = json.loads((run / "checkpoints" / "step-000004" / "state.json").read_text())["guard"]
    assert set(state["base_stats"]) == set(VIDEO_STATS) and len(state["base_stats"]["motion"]) == 2 * 2


def test_the_guard_drift_is_the_drift_of_the_saved_frames(run):
    """The last guard step's temporal drift from the PNG strips (8-bit frames: a few 1e-3 off)."""
    h = w = 32
    base = video_stats(read_video_grid(run / "samples" / "before.png", h, w))
    now = video_stats(read_video_grid(run / "samples" / "after.png", h, w))
    d = drift(now, base)
    last = [r for r in _rows(run) if "guard/hack_index" in r][-1]
    for k in TEMPORAL_STATS:
        assert d[k] == pytest.approx(last[f"guard/drift:{k}"], abs=0.05), k


def test_the_report_has_animated_previews(run):
    page = (run / "report.html").read_text()
    assert "Videos: base and current" in page
    for name in ("before", "step-000002", "after"):
        gif = run / "samples" / f"{name}.gif"
        assert f'src="samples/{name}.gif"' in page and gif.is_file()
        assert gif_frames(gif) == 5  # tiny-wan's 5 frames, all played
    assert "drift:motion" in page or "motion" in page


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    yield from chromium(tmp_path_factory)


@needs_browser
def test_the_video_report_loads_in_a_real_browser(run, driver):
    log = open_page(driver, run / "report.html")
    previews = preview_images(driver)
    assert len(previews) == 2 * (len(GUARD_STEPS) - 1)  # base beside each later guard step
    assert {p[0] for p in previews} == {"samples/before.gif", "samples/step-000002.gif", "samples/after.gif"}
    for src, complete, w, h in previews:
        assert complete and (w, h) == Image.open(run / src).size, src
        assert gif_frames(run / src) > 1
    assert [e["message"] for e in log if e.get("level") == "SEVERE"] == [], log


def test_judges_and_diversity_of_videos_use_their_frames():
    """Guard.measure on constructed videos [4, 5, 3, 32, 32] (2 prompts x 2 seeds): a judge without
    frames scores reward.frames (3: frames 0, 2, 4) averaged per video, one with frames [1] that
    frame alone; diversity is that of the per-video mean features of the reward.frames frames."""
    from srpo.guard.stats import diversity
    from srpo.rewards.factory import build_one
    from srpo.rewards.objective import reward_function

    judges = ('guard.judges=[{name: tiny_clip, options: {seed: 1, label: every}}, '
              '{name: tiny_clip, options: {seed: 1, label: second}, frames: [1]}]')
    cfg = load_config(WAN, ["guard.stop_when=[]", "guard.prompts=2", "guard.seeds=2", judges])
    reward_fn = reward_function(cfg, build_one(cfg.reward, device="cpu").frozen())
    guard = Guard(cfg, reward_fn, ["a red square", "a blue circle", "unused"], "cpu")
    videos = torch.rand(4, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = guard.measure(videos)
    prompts = guard.prompt_list()
    judge = build_one({"name": "tiny_clip", "options": {"seed": 1}}, device="cpu").frozen()
    with torch.no_grad():
        per_frame = torch.stack([judge.score(videos[:, f], prompts).float() for f in range(5)], 1)
        # the first judge's image encoder (docs/guard.md), on reward.frames' frames
        feats = torch.stack([judge.encode_image(videos[:, f]).float() for f in (0, 2, 4)], 1).mean(1)
    assert m["judge:every"] == pytest.approx(float(per_frame[:, [0, 2, 4]].mean()), abs=1e-6)
    assert m["judge:second"] == pytest.approx(float(per_frame[:, 1].mean()), abs=1e-6)
    assert m["diversity_abs"] == pytest.approx(diversity(feats, 2), abs=1e-6) and m["diversity"] == 1.0
    assert m["hack_index"] == 0.0 and {f"drift:{k}" for k in VIDEO_STATS} <= set(m)
    with pytest.raises(ValueError, match="the guard of a video run got"):
        guard.measure(videos[:, 0])
