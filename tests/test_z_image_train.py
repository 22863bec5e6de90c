"""Z-Image end to end through the real CLI: `srpo train configs/tiny-z-image.yaml` (full and LoRA),
final/ loads with diffusers' ZImageTransformer2DModel, the LoRA file loads with ZImagePipeline's
load_lora_weights and reproduces the merged model's images, `srpo sample` renders the run, and
`srpo plan` sizes the config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-z-image.yaml"
FAST = ["--set", "train.max_steps=3", "--set", "log.progress=false", "--set", "log.sample_every=0",
        "--set", "log.checkpoint_every=0", "--set", "rollout.steps=4", "--set", "data.eval_steps=4",
        # the reward-hacking guard is tested on its own; a random tiny model's image statistics have
        # almost no spread across prompts, so its drift rule would stop these 3-update runs
        "--set", "guard.enabled=false"]


def srpo(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image")
    srpo("train", CONFIG, "--output", root / "full", *FAST)
    srpo("train", CONFIG, "--output", root / "lora", *FAST,
         "--set", "lora.enabled=true", "--set", "lora.rank=4", "--set", "lora.alpha=8",
         "--set", "lora.init=gaussian", "--set", "train.lr=0.05")
    return root


def test_full_run_final_loads_in_diffusers_and_moved(runs):
    from diffusers import ZImageTransformer2DModel

    from srpo.models.z_image_tiny import build_tiny_z_image

    final = ZImageTransformer2DModel.from_pretrained(str(runs / "full" / "final"), local_files_only=True)
    base = build_tiny_z_image(seed=0).transformer.state_dict()
    trained = final.state_dict()
    assert set(trained) == set(base)
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-4  # it trained
    rows = [json.loads(ln) for ln in (runs / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped"] == 0 for r in rows)
    summary = json.loads((runs / "full" / "summary.json").read_text())
    assert "eval_before" in summary and "eval_after" in summary


def test_lora_file_loads_in_the_pipeline_and_reproduces_the_merged_model(runs):
    from diffusers import ZImageTransformer2DModel

    from srpo.models.z_image_tiny import build_tiny_z_image
    from srpo.sampling import rollout

    run = runs / "lora"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    base = build_tiny_z_image(seed=0)
    pipe = base.pipeline()
    prompts = ["a red cube on a table", "a blue ball"]
    noise = torch.randn(base.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(4))
    cond = base.encode_prompts(prompts)
    before = base.pipeline_images(cond, noise, 4, 1.0)
    pipe.load_lora_weights(str(run / "lora"))  # diffusers' own loader, on the base weights
    with_lora = pipe(prompt_embeds=base._unpad(cond), latents=noise, height=32, width=32, num_inference_steps=4,
                     guidance_scale=0.0, output_type="pt").images  # Turbo: no CFG
    merged = build_tiny_z_image(seed=0)
    merged.transformer = ZImageTransformer2DModel.from_pretrained(str(run / "final"), local_files_only=True)
    ours = merged.decode(rollout(merged, cond, noise, steps=4, guidance=1.0))
    assert (with_lora - ours).abs().max() < 1e-4
    assert (with_lora - before).abs().max() > 1e-3  # the adapters really change the images


def test_sample_renders_the_z_image_run(runs, tmp_path):
    from PIL import Image

    srpo("sample", "--model", runs / "full", "--prompt", "a lighthouse at dusk", "--steps", "3",
         "--output", tmp_path / "s")
    images = sorted((tmp_path / "s").glob("0000-*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (32, 32)


def test_plan_sizes_the_config(capsys):
    from srpo.cli import main

    assert main(["plan", str(CONFIG)]) == 0  # the CLI's own entry point, in process
    out = capsys.readouterr().out
    assert "model: tiny Z-Image" in out and "total" in out
