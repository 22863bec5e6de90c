"""End to end through the real CLI: `srpo train configs/tiny.yaml`, then `srpo sample` on the run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def srpo(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    # one control-word pair so the held-out SRP reward measures exactly what was trained
    srpo("train", ROOT / "configs" / "tiny.yaml", "--output", out,
         "--set", "srp.pos_words=[Real]", "--set", "srp.neg_words=[Painting]",
         "--set", "log.progress=false")
    return out


def test_run_folder_contents(run_dir):
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "curves.png", "samples/before.png",
                 "samples/after.png", "samples/step-000006.png", "checkpoints/step-000012/state.json",
                 "final/config.json", "final/diffusion_pytorch_model.safetensors"]:
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"step", "loss", "reward", "grad_norm", "seconds"} <= set(r)
        assert r["grad_norm"] > 0 and r["skipped"] == 0
    # the configured words were used: update s scored pair (s + 1) of the cycle (the reference's
    # counter starts at 1), here the one pair given on the command line, never a default word
    pos_words, neg_words = ["Real"], ["Painting"]
    assert [(r["pos_word"], r["neg_word"]) for r in rows] == \
        [(pos_words[(s + 1) % len(pos_words)], neg_words[(s + 1) % len(neg_words)]) for s in range(12)]
    for r in rows:  # both branches scored those words with SRP (their two parts are logged)
        assert {"denoise/pos", "denoise/neg", "inversion/pos", "inversion/neg"} <= set(r)
        assert all(math.isfinite(r[k]) for k in ("denoise/pos", "denoise/neg", "inversion/pos", "inversion/neg"))


def test_srp_reward_on_held_out_prompts_rises(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["eval_before"]["srp_reward"], summary["eval_after"]["srp_reward"]
    assert after > before, (before, after)


def test_final_weights_load_in_diffusers_and_differ_from_base(run_dir):
    from diffusers import FluxTransformer2DModel

    from srpo.models.tiny import build_tiny_flux

    trained = FluxTransformer2DModel.from_pretrained(run_dir / "final")
    base = build_tiny_flux(seed=0).transformer
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), base.parameters())]
    assert max(diffs) > 1e-4  # training moved the weights
    assert len(diffs) == len(list(base.parameters()))


def test_sample_renders_with_trained_run(run_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "samples"
    srpo("sample", "--model", run_dir, "--prompts", prompts, "--steps", "4", "--guidance", "3.5",
         "--seed", "3", "--output", out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["0000-a-red-circle.png", "0001-a-blue-square.png", "grid.png"]
    from PIL import Image

    assert Image.open(out / "0000-a-red-circle.png").size == (32, 32)
