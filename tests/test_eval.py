"""``srpo eval`` on real (tiny) models, no mocks: a tiny run trained by ``srpo train``, a tiny FLUX
pipeline folder whose scheduler shifts dynamically as FLUX.1-dev's does, the lab's judge.

- the four outputs (and scores.csv, images/) have the right shapes, and every number equals
  scoring the written PNGs directly and recomputing the statistics;
- the statistics module against direct formulas;
- ``--schedule pipeline`` images equal FluxPipeline's own within 1e-4, ``--schedule training``
  equals the trainer's rollout; ``srpo sample --schedule`` the same;
- prompt files of every form training reads give the same evaluation;
- eval.html in headless chromium (as tests/test_report_browser.py opens the run report);
- bad input: one line, exit 2, nothing rendered or overwritten.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from browser import chromium, needs_browser, open_page
from srpo import seeding
from srpo.cli import main as cli
from srpo.data import load_prompts
from srpo.eval import render, stats

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "configs" / "prompts" / "tiny-eval.txt"
TRAIN = ["--set", "train.max_steps=4", "--set", "guard.every=2", "--set", "rollout.steps=2", "--set",
         "data.eval_steps=2", "--set", "log.checkpoint_every=2", "--set", "log.tensorboard=false",
         "--set", "log.progress=false"]
SEEDS, N_PROMPTS = 2, 4
WHICH = ["base", "run:final", "run:step-2"]
H, W = 32, 48  # not square: the dynamic shift reads the token count
DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                     use_dynamic_shifting=True)  # FLUX.1-dev's scheduler/scheduler_config.json


def _eval(*args) -> int:
    return cli(["eval", *map(str, args)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-run") / "run"
    assert cli(["train", str(ROOT / "configs" / "tiny.yaml"), "--output", str(out), *TRAIN]) == 0
    return out


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    """A YAML list of specs: a second tiny CLIP (another seed) under its own label."""
    path = tmp_path_factory.mktemp("specs") / "rewards.yaml"
    path.write_text("- {name: tiny_clip, options: {seed: 1, label: clip_seed1}}\n")
    return path


@pytest.fixture(scope="module")
def evaluated(run, spec_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    assert _eval(run, "--prompts", PROMPTS, "--which", "base,final,step-2", "--reward", "tiny_clip",
                 "--reward", f"{spec_file},lab_realism", "--seeds", SEEDS, "--steps", 2, "--output", out) == 0
    return out


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def test_outputs_have_the_right_shapes(evaluated):
    data = json.loads((evaluated / "eval.json").read_text())
    labels = [c["label"] for c in data["checkpoints"]]
    assert labels == WHICH and data["baseline"] == "base"
    assert list(data["results"]) == list(data["scores"]) == ["tiny_clip", "clip_seed1", "lab_realism"]
    assert data["prompts"] == load_prompts(str(PROMPTS)) and len(data["prompts"]) == N_PROMPTS
    assert data["settings"]["schedule"] == "pipeline" and data["settings"]["seeds"] == SEEDS
    for reward, per in data["scores"].items():
        assert list(per) == labels and all(len(v) == N_PROMPTS * SEEDS for v in per.values())
        assert data["results"][reward]["base"]["win_rate"] is None
        assert all(0 <= data["results"][reward][c]["win_rate"] <= 1 for c in labels[1:])
    for c in data["checkpoints"]:
        assert len(c["images"]) == N_PROMPTS * SEEDS
        for name in c["images"] + ["grid.png"]:
            assert (evaluated / c["dir"] / name).is_file()
        assert Image.open(evaluated / c["dir"] / c["images"][0]).size == (32, 32)
    summary = list(csv.DictReader((evaluated / "eval.csv").open()))
    assert [(r["reward"], r["checkpoint"]) for r in summary] == [(r, c) for r in data["results"] for c in labels]
    per_image = list(csv.DictReader((evaluated / "scores.csv").open()))
    assert len(per_image) == len(labels) * N_PROMPTS * SEEDS
    md = (evaluated / "eval.md").read_text().splitlines()
    table = [ln for ln in md if ln.startswith("| ")]
    assert table[0] == "| checkpoint | tiny_clip | clip_seed1 | lab_realism |" and len(table) == 1 + len(labels)
    # the table's rendered images differ between checkpoints (training moved the model)
    assert not torch.equal(_png(evaluated / "images/base/p0000-s00.png"), _png(evaluated / "images/run-final/p0000-s00.png"))


def test_numbers_equal_scoring_the_pngs_directly(evaluated):
    from srpo.commands.score import load_image
    from srpo.lab.judge import Judge
    from srpo.rewards.factory import build_reward
    from srpo.eval.scorers import LAB_JUDGE

    data = json.loads((evaluated / "eval.json").read_text())
    rewards = {"tiny_clip": build_reward({"name": "tiny_clip"}).frozen(),
               "clip_seed1": build_reward({"name": "tiny_clip", "options": {"seed": 1}}).frozen()}
    judge = Judge.load(LAB_JUDGE)
    every = [p for p in data["prompts"] for _ in range(SEEDS)]
    for c in data["checkpoints"]:
        images = torch.cat([load_image(evaluated / c["dir"] / n) for n in c["images"]])
        with torch.no_grad():
            for name, reward in rewards.items():
                direct = reward.score(images, every).double().numpy()
                assert np.allclose(data["scores"][name][c["label"]], direct, rtol=0, atol=1e-5), (name, c["label"])
        photo, _ = judge.matches(images, every)
        assert data["scores"]["lab_realism"][c["label"]] == photo.float().tolist()
    for name, per in data["scores"].items():
        base = np.asarray(per["base"]).reshape(N_PROMPTS, SEEDS).mean(1)
        for label, values in per.items():
            v = np.asarray(values).reshape(N_PROMPTS, SEEDS).mean(1)
            r = data["results"][name][label]
            assert r["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert r["ci95"] == pytest.approx(list(stats.bootstrap_ci(v)), abs=1e-12)
            if label != "base":
                assert r["win_rate"] == pytest.approx(np.mean([(a > b) + 0.5 * (a == b) for a, b in zip(v, base)]))
    rows = list(csv.DictReader((evaluated / "eval.csv").open()))
    for row in rows:
        r = data["results"][row["reward"]][row["checkpoint"]]
        assert float(row["mean"]) == pytest.approx(r["mean"], abs=1e-6)
        assert float(row["ci95_low"]) == pytest.approx(r["ci95"][0], abs=1e-6)


# ---- statistics ---------------------------------------------------------------------------------

def test_win_rate_is_the_paired_fraction_with_ties_half():
    a, b = [3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0]
    assert stats.win_rate(a, b) == (1 + 0 + 0.5 + 1) / 4
    assert stats.win_rate(b, a) == 1 - stats.win_rate(a, b)
    assert stats.win_rate(a, a) == 0.5
    with pytest.raises(ValueError):
        stats.win_rate([1.0], [1.0, 2.0])


def test_bootstrap_equals_the_direct_resampling_loop():
    """The percentiles of the means of resamples drawn one by one from the same generator."""
    v = np.random.default_rng(5).normal(size=37)
    rng = np.random.default_rng(stats.SEED)
    means = [v[rng.integers(0, v.size, size=v.size)].mean() for _ in range(2000)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert stats.bootstrap_ci(v, resamples=2000) == pytest.approx((lo, hi), abs=1e-12)
    assert stats.bootstrap_ci(v) == stats.bootstrap_ci(v)  # fixed seed: the same table every time
    assert stats.bootstrap_ci(v, seed=1) != stats.bootstrap_ci(v)


def test_bootstrap_against_closed_forms():
    # large n: the normal interval mean +- 1.96 sd / sqrt(n) (sd with ddof 0, the bootstrap's)
    v = np.random.default_rng(0).normal(2.0, 3.0, size=400)
    lo, hi = stats.bootstrap_ci(v)
    half = 1.96 * v.std() / np.sqrt(v.size)
    assert lo == pytest.approx(v.mean() - half, abs=0.1 * half) and hi == pytest.approx(v.mean() + half, abs=0.1 * half)
    # two values: the resampled means are a, (a+b)/2, b with probabilities 1/4, 1/2, 1/4
    assert stats.bootstrap_ci([1.0, 3.0]) == (1.0, 3.0)
    assert stats.bootstrap_ci([4.0] * 5) == (4.0, 4.0)
    assert stats.bootstrap_ci([7.0]) == (7.0, 7.0)


def test_per_prompt_means_over_seeds_and_summary():
    scores = [1.0, 3.0, 2.0, 2.0, 0.0, 1.0]  # 3 prompts x 2 seeds
    assert stats.per_prompt(scores, 2).tolist() == [2.0, 2.0, 0.5]
    with pytest.raises(ValueError):
        stats.per_prompt(scores, 4)
    s = stats.summary([2.0, 2.0, 0.5], base=[1.0, 2.0, 1.0])
    assert s["mean"] == 1.5 and s["win_rate"] == (1 + 0.5 + 0) / 3 and s["n_prompts"] == 3
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]


# ---- schedules ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    """A tiny FLUX pipeline folder whose scheduler is FLUX.1-dev's (dynamic shift)."""
    from srpo.models.tiny import save_tiny_flux

    folder = tmp_path_factory.mktemp("flux-dev") / "tiny-flux-dev"
    save_tiny_flux(folder, seed=0)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **DEV_SCHEDULER}))
    return folder


def _folder_model(folder, schedule):
    from srpo.config import ModelConfig
    from srpo.models import load_model

    return load_model(ModelConfig(name="flux", path=str(folder)), "cpu").use_schedule(schedule)


def _noise(model, n):
    return seeding.noise(model.latent_shape(1, H, W), 1234, 0, render.image_prompts(["x"] * n, 1)[1], "eval_noise")


def test_pipeline_schedule_equals_flux_pipeline(dev_folder, tmp_path):
    from diffusers import FluxPipeline

    from srpo.evaluate import generate
    from srpo.models.base import pack

    prompts = load_prompts(str(PROMPTS))[:2]
    model = _folder_model(dev_folder, "pipeline")
    ours = generate(model, prompts, 1234, 4, 3.5, H, W)
    pipe = FluxPipeline.from_pretrained(str(dev_folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.use_dynamic_shifting
    with torch.no_grad():
        theirs = pipe(prompt=prompts, latents=pack(_noise(model, 2)), height=H, width=W, num_inference_steps=4,
                      guidance_scale=3.5, output_type="pt", max_sequence_length=model.max_sequence_length).images
    assert (ours - theirs.float()).abs().max() < 1e-4
    assert torch.allclose(model.schedule(4, H, W), pipe.scheduler.sigmas.double(), atol=1e-6)
    # the trainer's schedule (fixed shift 3, floored timesteps) is another one
    training = _folder_model(dev_folder, "training")
    assert (generate(training, prompts, 1234, 4, 3.5, H, W) - theirs).abs().max() > 1e-2
    # srpo eval on the folder writes those images (8-bit) ...
    out = tmp_path / "ev"
    assert _eval(dev_folder, "--prompts", PROMPTS, "--reward", "tiny_clip", "--seeds", 1, "--steps", 4,
                 "--height", H, "--width", W, "--output", out) == 0
    name = dev_folder.name
    for i in range(2):
        assert (_png(out / "images" / name / f"p{i:04d}-s00.png").int() - render.to_uint8(theirs[i]).int()).abs().max() <= 1
    # ... and srpo sample the same choice
    sample = tmp_path / "sample"
    for schedule in ("pipeline", "training"):
        assert cli(["sample", "--model", str(dev_folder), "--prompt", prompts[0], "--steps", "4", "--height", str(H),
                    "--width", str(W), "--seed", "1234", "--schedule", schedule, "--output", str(sample / schedule)]) == 0
    png = {s: _png(next((sample / s).glob("0000-*.png"))).int() for s in ("pipeline", "training")}
    assert (png["pipeline"] - render.to_uint8(theirs[0]).int()).abs().max() <= 1
    assert (png["training"] - png["pipeline"]).abs().max() > 2


def test_model_options_reach_a_pipeline_folder(dev_folder, tmp_path, capsys):
    """--model-option KEY=VALUE: a pipeline folder loads with those model.options (here FLUX's
    T5 length), and renders what the family loaded with them renders; bad pairs are one line."""
    from srpo.evaluate import generate

    prompts = load_prompts(str(PROMPTS))[:2]
    out = tmp_path / "ev"
    assert _eval(dev_folder, "--prompts", PROMPTS, "--reward", "tiny_clip", "--seeds", 1, "--steps", 2,
                 "--guidance", 3.5, "--height", H, "--width", W, "--model-option", "max_sequence_length=8",
                 "--output", out) == 0
    short = generate(_folder_model_with(dev_folder, max_sequence_length=8), prompts, 1234, 2, 3.5, H, W)
    default = generate(_folder_model_with(dev_folder), prompts, 1234, 2, 3.5, H, W)
    assert (short - default).abs().max() > 1e-2  # the option changes the images
    for i in range(2):
        png = _png(out / "images" / dev_folder.name / f"p{i:04d}-s00.png").int()
        assert (png - render.to_uint8(short[i]).int()).abs().max() <= 1
    capsys.readouterr()
    assert _eval(dev_folder, "--prompts", PROMPTS, "--model-option", "max_sequence_length",
                 "--output", tmp_path / "bad") == 2
    assert "write KEY=VALUE" in capsys.readouterr().err


def _folder_model_with(folder, **options):
    from srpo.config import ModelConfig
    from srpo.models import load_model

    return load_model(ModelConfig(name="flux", path=str(folder), options=options), "cpu").use_schedule("pipeline")


def test_training_schedule_equals_the_trainers_rollout(run, tmp_path):
    from srpo.config import load_config
    from srpo.export import run_weights
    from srpo.models import load_model
    from srpo.sampling import rollout

    out = tmp_path / "ev"
    assert _eval(run, "--prompts", PROMPTS, "--which", "base,final", "--reward", "tiny_clip", "--steps", 2,
                 "--schedule", "training", "--output", out) == 0
    cfg = load_config(run / "config.yaml")
    prompts = load_prompts(str(PROMPTS))
    every, keys = render.image_prompts(prompts, SEEDS)
    for label, model in (("base", load_model(cfg.model, "cpu")), ("run-final", run_weights(run, "final")[1])):
        noise = seeding.noise(model.latent_shape(1, 32, 32), cfg.data.eval_seed, 0, keys, "eval_noise")
        with torch.no_grad():
            x0 = rollout(model, model.encode_prompts(every), noise, steps=2, guidance=cfg.data.eval_guidance)
            want = render.to_uint8(model.decode(x0))
        got = torch.stack([_png(out / "images" / label / render.image_name(i // SEEDS, i % SEEDS))
                           for i in range(len(every))])
        assert torch.equal(got, want), label
    pipeline = json.loads((tmp_path / "ev" / "eval.json").read_text())["settings"]["schedule"]
    assert pipeline == "training"


def test_every_prompt_format_gives_the_same_evaluation(run, tmp_path):
    import datasets
    import pandas as pd

    prompts = ["a red circle, photo", 'a "blue" square, painting']
    forms = {"p.txt": lambda p: p.write_text("\n".join(prompts) + "\n"),
             "p.jsonl": lambda p: p.write_text("".join(json.dumps({"prompt": x}) + "\n" for x in prompts)),
             "p.csv": lambda p: pd.DataFrame({"prompt": prompts}).to_csv(p, index=False),
             "p.parquet": lambda p: pd.DataFrame({"prompt": prompts}).to_parquet(p),
             "ds": lambda p: datasets.Dataset.from_dict({"prompt": prompts}).save_to_disk(str(p))}
    seen = []
    for name, write in forms.items():
        write(tmp_path / name)
        out = tmp_path / f"ev-{name}"
        assert _eval(run, "--prompts", tmp_path / name, "--which", "final", "--reward", "tiny_clip", "--seeds", 1,
                     "--steps", 1, "--output", out) == 0
        data = json.loads((out / "eval.json").read_text())
        seen.append((data["prompts"], data["scores"]))
    assert seen[0][0] == prompts and all(s == seen[0] for s in seen)


# ---- errors -------------------------------------------------------------------------------------

def _error(capsys, *args) -> str:
    capsys.readouterr()
    assert _eval(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("srpo: error:") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_before_any_rendering(run, tmp_path, capsys):
    out = tmp_path / "ev"
    base = [run, "--prompts", PROMPTS, "--steps", 1, "--output", out]
    assert "not found" in _error(capsys, *base, "--reward", f"hps={tmp_path / 'missing.pt'}")
    assert "needs its checkpoint" in _error(capsys, *base, "--reward", "pickscore")
    assert "unknown reward" in _error(capsys, *base, "--reward", "no_such_reward")
    assert "options.qwen_path" in _error(capsys, *base, "--reward", _yaml(tmp_path, run))
    err = _error(capsys, *base, "--reward", "tiny_clip", "--which", "final,step-3")
    assert "has no step-3 (it has: base, best, final, step-2, step-4)" in err
    assert "not base, best, final or step-N" in _error(capsys, *base, "--which", "last")
    assert "not a folder" in _error(capsys, tmp_path / "nope", "--prompts", PROMPTS, "--output", out)
    assert "--baseline" in _error(capsys, *base, "--reward", "tiny_clip", "--baseline", "other")
    assert "--seeds must be a positive" in _error(capsys, *base, "--reward", "tiny_clip", "--seeds", 0)
    assert "prompts file not found" in _error(capsys, run, "--prompts", tmp_path / "none.txt", "--output", out)
    assert not out.exists()  # nothing rendered
    with pytest.raises(SystemExit) as e:  # argparse: its own one line, exit 2
        _eval(*base, "--schedule", "fast")
    assert e.value.code == 2


def _yaml(tmp_path, run) -> Path:
    path = tmp_path / "hpsv3.yaml"
    (tmp_path / "HPSv3.safetensors").write_bytes(b"")
    path.write_text(f"name: hpsv3\npath: HPSv3.safetensors\noptions: {{qwen_path: {tmp_path / 'no-qwen'}}}\n")
    return path


def test_an_earlier_evaluation_is_never_overwritten(evaluated, run, capsys):
    before = (evaluated / "eval.json").read_bytes()
    assert "already holds an evaluation" in _error(capsys, run, "--prompts", PROMPTS, "--reward", "tiny_clip",
                                                   "--output", evaluated)
    assert (evaluated / "eval.json").read_bytes() == before


# ---- the page in a real browser -----------------------------------------------------------------

browser = needs_browser


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    yield from chromium(tmp_path_factory, window=(1800, 1200))  # room for the table and the grids side by side


_open = open_page


def _images(driver) -> list[list]:
    return driver.execute_script("return Array.from(document.images).map("
                                 "i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);")


@browser
def test_eval_html_renders_in_a_real_browser(evaluated, driver):
    data = json.loads((evaluated / "eval.json").read_text())
    log = _open(driver, evaluated / "eval.html")
    assert driver.title == f"srpo eval: {evaluated.name}"
    imgs = _images(driver)
    n = len(data["checkpoints"])
    assert len(imgs) == n + n * N_PROMPTS * SEEDS  # a grid per checkpoint, then every image
    for src, complete, w, h in imgs:
        assert complete and w > 0, src
        assert (w, h) == Image.open(evaluated / src).size, src
    rows = driver.execute_script("return Array.from(document.querySelector('#results').rows).map("
                                 "r => Array.from(r.cells).map(c => c.textContent));")
    assert rows[0] == ["checkpoint", *data["results"]]
    assert [r[0] for r in rows[1:]] == [c["label"] for c in data["checkpoints"]]
    for r in rows[1:]:
        for reward, cell in zip(data["results"], r[1:]):
            assert cell.startswith(f"{data['results'][reward][r[0]]['mean']:.4f} ["), (reward, cell)
            assert ("win" in cell) == (r[0] != "base")
    # table and grids side by side: the grids start right of the table, on the same band
    table, grids = driver.execute_script(
        "return ['#results', '.grids'].map(s => document.querySelector(s).getBoundingClientRect().toJSON());")
    assert grids["left"] >= table["right"] and grids["top"] < table["bottom"]
    prompt_rows = driver.execute_script("return document.querySelector('table.prompts').rows.length;")
    assert prompt_rows == 1 + N_PROMPTS
    assert [e for e in log if e.get("level") == "SEVERE"] == [], log


@browser
def test_the_page_checks_catch_a_missing_image(evaluated, driver):
    html = (evaluated / "eval.html").read_text()
    page = evaluated / "eval-broken.html"
    page.write_text(html.replace('src="images/base/grid.png"', 'src="images/base/missing.png"'))
    try:
        log = _open(driver, page)
        assert [src for src, ok, w, _ in _images(driver) if not (ok and w > 0)] == ["images/base/missing.png"]
        assert any("missing.png" in e["message"] for e in log if e.get("level") == "SEVERE")
    finally:
        page.unlink()
