"""``srpo eval`` on video checkpoints: a tiny-wan run trained through the CLI (guard on), its base and
final rendered as videos, each scored with the rewards on ``reward.frames`` frames as training
scores them, the four outputs written with animated previews in eval.html (loaded in headless
chromium).

The reference scores are computed here from the definition: the videos rendered again with the
guard's noise keys, and the reward called frame by frame on the frames ``reward.frames`` names
(3 of 5: indices 0, 2, 4), averaged per video.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from browser import chromium, needs_browser, open_page, preview_images
from srpo.cli import main as cli
from srpo.config import load_config
from srpo.data import load_prompts
from srpo.eval import render
from srpo.video import gif_frames

ROOT = Path(__file__).resolve().parents[1]
WAN = ROOT / "configs" / "tiny-wan.yaml"
PROMPTS = ROOT / "configs" / "prompts" / "tiny-eval.txt"
TRAIN = ["guard.enabled=true", "guard.stop_when=[]", "train.max_steps=2", "guard.every=2", "guard.prompts=2",
         "rollout.steps=2", "data.eval_steps=2", "log.checkpoint_every=0", "log.tensorboard=false",
         "log.progress=false"]
SEEDS, FRAMES = 2, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-video-run") / "run"
    assert cli(["train", str(WAN), "--output", str(out), *[a for s in TRAIN for a in ("--set", s)]]) == 0
    return out


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-video")
    spec = tmp / "first.yaml"  # the same reward on the first frame only, under its own label
    spec.write_text("- {name: tiny_clip, options: {seed: 0, label: first_frame}, frames: [0]}\n")
    out = tmp / "out"
    assert cli(["eval", str(run), "--prompts", str(PROMPTS), "--which", "base,final", "--reward", "tiny_clip",
                "--reward", str(spec), "--seeds", str(SEEDS), "--steps", "2", "--output", str(out)]) == 0
    return out


def _data(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


@pytest.fixture(scope="module")
def reference(run):
    """The base model's videos (uint8, [N, F, 3, H, W]) rendered here, and the reward."""
    from srpo.evaluate import generate
    from srpo.models import load_model
    from srpo.rewards.factory import build_one

    cfg = load_config(run / "config.yaml")
    model = load_model(cfg.model, "cpu")
    model.set_frames(cfg.rollout.frames)
    model = model.use_schedule("pipeline")
    prompts = load_prompts(str(PROMPTS))
    every, keys = render.image_prompts(prompts, SEEDS)
    videos = generate(model, every, cfg.data.eval_seed, 2, cfg.data.eval_guidance, cfg.rollout.height,
                      cfg.rollout.width, batch=8, keys=keys)
    reward = build_one({"name": "tiny_clip", "options": {"seed": 0}}, device="cpu").frozen()
    return render.to_uint8(videos), every, reward


def test_the_four_outputs_and_the_settings(evaluated):
    for name in ("eval.json", "eval.csv", "eval.md", "eval.html", "scores.csv"):
        assert (evaluated / name).is_file(), name
    d = _data(evaluated)
    assert d["settings"]["frames"] == FRAMES
    assert [c["label"] for c in d["checkpoints"]] == ["base", "run:final"]
    assert all(c["frames"] == FRAMES and c["family"] == "tiny_wan" for c in d["checkpoints"])
    assert {r["label"]: r["frames"] for r in d["rewards"]} == {"tiny_clip": 3, "first_frame": [0]}  # reward.frames: 3
    rows = list(csv.DictReader((evaluated / "eval.csv").open()))
    assert {(r["reward"], r["checkpoint"]) for r in rows} == {(a, b) for a in ("tiny_clip", "first_frame")
                                                              for b in ("base", "run:final")}
    md = (evaluated / "eval.md").read_text()
    assert "| base |" in md and "| run:final |" in md


def test_scores_are_the_reward_on_reward_frames_frames(evaluated, reference):
    videos, every, reward = reference
    d = _data(evaluated)
    x = videos.float() / 255
    with torch.no_grad():
        per_frame = torch.stack([reward.score(x[:, f], every).float() for f in range(FRAMES)], 1)  # [N, F]
    want = per_frame[:, [0, 2, 4]].mean(1)  # reward.frames 3 of 5 frames: first, middle, last
    assert d["scores"]["tiny_clip"]["base"] == pytest.approx(want.tolist(), abs=1e-5)
    assert d["scores"]["first_frame"]["base"] == pytest.approx(per_frame[:, 0].tolist(), abs=1e-5)
    assert not np.allclose(want.numpy(), per_frame[:, 0].numpy(), atol=1e-5)  # the frames choice matters here
    mean = float(want.reshape(-1, SEEDS).mean(1).mean())
    assert d["results"]["tiny_clip"]["base"]["mean"] == pytest.approx(mean, abs=1e-5)


def test_first_frame_pngs_and_animated_gifs(evaluated, reference):
    videos, _, _ = reference
    d = _data(evaluated)
    base = d["checkpoints"][0]
    assert base["videos"] == [f"p{p:04d}-s{s:02d}.gif" for p in range(4) for s in range(SEEDS)]
    folder = evaluated / base["dir"]
    for i, (png, gif) in enumerate(zip(base["images"], base["videos"])):
        first = torch.from_numpy(np.asarray(Image.open(folder / png).convert("RGB")).copy()).permute(2, 0, 1)
        assert (first.int() - videos[i, 0].int()).abs().max() <= 1, png  # the video's first frame
        assert gif_frames(folder / gif) == FRAMES, gif
        assert Image.open(folder / gif).size == (32, 32)
    for c in d["checkpoints"]:
        assert gif_frames(evaluated / c["dir"] / "grid.gif") == FRAMES
    page = (evaluated / "eval.html").read_text()
    assert page.count('class="preview"') == len(d["checkpoints"]) * (1 + 4 * SEEDS)


def test_eval_refuses_an_output_that_holds_an_evaluation(evaluated, run, capsys):
    capsys.readouterr()
    assert cli(["eval", str(run), "--prompts", str(PROMPTS), "--output", str(evaluated)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("srpo: error:") and err.count("\n") == 1 and "already holds an evaluation" in err


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    yield from chromium(tmp_path_factory)


@needs_browser
def test_eval_html_plays_the_videos_in_a_real_browser(evaluated, driver):
    log = open_page(driver, evaluated / "eval.html")
    previews = preview_images(driver)
    d = _data(evaluated)
    assert len(previews) == len(d["checkpoints"]) * (1 + 4 * SEEDS)  # grid.gif and one per video
    for src, complete, w, h in previews:
        assert src.endswith(".gif") and complete and (w, h) == Image.open(evaluated / src).size, src
        assert gif_frames(evaluated / src) > 1, src
    assert [e["message"] for e in log if e.get("level") == "SEVERE"] == [], log
