"""FLUX.2 end to end through the real CLI: `srpo train configs/tiny-flux2.yaml` (FLUX.2 [dev] full;
FLUX.2 [klein] LoRA under true CFG), final/ loads with diffusers' Flux2Transformer2DModel, the LoRA
file loads with Flux2KleinPipeline's load_lora_weights and reproduces the merged model's images
(FLUX.2 [dev] adapters are checked against Flux2Pipeline's loader in test_flux2.py), `srpo sample`
renders the run, `srpo plan` sizes the config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-flux2.yaml"
FAST = ["--set", "train.max_steps=3", "--set", "log.progress=false", "--set", "log.sample_every=0",
        "--set", "log.checkpoint_every=0", "--set", "rollout.steps=4", "--set", "data.eval_steps=4",
        # the reward-hacking guard is tested on its own (tests/test_guard.py)
        "--set", "guard.enabled=false"]
LORA = ["--set", "lora.enabled=true", "--set", "lora.rank=4", "--set", "lora.alpha=8", "--set", "lora.init=gaussian",
        "--set", "train.lr=0.05"]


def srpo(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    srpo("train", CONFIG, "--output", root / "full", *FAST)
    # klein: true CFG 4 in the rollouts, the conditional pass alone in the gradient forward
    srpo("train", CONFIG, "--output", root / "klein", *FAST, *LORA, "--set", "model.name=tiny_flux2_klein",
         "--set", "train.guidance=1.0")
    return root


def test_full_run_final_loads_in_diffusers_and_moved(runs):
    from diffusers import Flux2Transformer2DModel

    from srpo.models.flux2_tiny import build_tiny_flux2

    final = Flux2Transformer2DModel.from_pretrained(str(runs / "full" / "final"), local_files_only=True)
    base = build_tiny_flux2(seed=0).transformer.state_dict()
    trained = final.state_dict()
    assert set(trained) == set(base)
    assert max((trained[k] - base[k]).abs().max().item() for k in base) > 1e-4  # it trained
    rows = [json.loads(ln) for ln in (runs / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped"] == 0 for r in rows)
    summary = json.loads((runs / "full" / "summary.json").read_text())
    assert "eval_before" in summary and "eval_after" in summary


def test_lora_file_loads_in_the_pipeline_and_reproduces_the_merged_model(runs):
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    from srpo.models.flux2_tiny import build_tiny_flux2_klein
    from srpo.sampling import rollout

    run = runs / "klein"
    file = run / "lora" / "pytorch_lora_weights.safetensors"
    assert file.is_file()
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
    assert any(".single_transformer_blocks.0.attn.to_out.lora_A" in k for k in keys)
    assert any(".transformer_blocks.0.ff_context.linear_out.lora_B" in k for k in keys)
    base = build_tiny_flux2_klein(seed=0)
    pipe = base.pipeline()
    prompts = ["a red cube on a table", "a blue ball"]
    noise = torch.randn(base.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(4))
    cond = base.encode_prompts(prompts)
    before = base.pipeline_images(cond, noise, 4, 4.0)
    pipe.load_lora_weights(str(run / "lora"))  # diffusers' own loader, on the base weights
    with_lora = pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                     latents=noise, height=32, width=32, num_inference_steps=4, guidance_scale=4.0, output_type="pt",
                     max_sequence_length=base.max_sequence_length).images
    merged = build_tiny_flux2_klein(seed=0)
    merged.transformer = Flux2Transformer2DModel.from_pretrained(str(run / "final"), local_files_only=True)
    ours = merged.decode(rollout(merged, cond, noise, steps=4, guidance=4.0))
    assert (with_lora - ours).abs().max() < 1e-4
    assert (with_lora - before).abs().max() > 1e-3  # the adapters really change the images


def test_sample_renders_the_flux2_run(runs, tmp_path):
    from PIL import Image

    srpo("sample", "--model", runs / "full", "--prompt", "a lighthouse at dusk", "--steps", "3",
         "--output", tmp_path / "s")
    images = sorted((tmp_path / "s").glob("0000-*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (32, 32)


def test_plan_sizes_the_config():
    res = srpo("plan", CONFIG)
    assert "tiny Flux2Pipeline" in res.stdout
