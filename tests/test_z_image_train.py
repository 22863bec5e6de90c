"""Z-Image end to end through the real CLI: `srpo train configs/tiny-z-image.yaml` (full and LoRA),
final/ loads with diffusers' ZImageTransformer2DModel, the LoRA file loads with ZImagePipeline's
load_lora_weights and reproduces the merged model's images, `srpo sample` renders the run, and
`srpo plan` sizes the config."""

from pathlib import Path

import pytest
import torch

from family_runs import FAST, LORA, check_full_run, check_sample, srpo

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-z-image.yaml"
# the reward-hacking guard is tested on its own; a random tiny model's image statistics have almost
# no spread across prompts, so its drift rule would stop these 3-update runs
FAST = FAST + ["--set", "guard.enabled=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image")
    srpo("train", CONFIG, "--output", root / "full", *FAST)
    srpo("train", CONFIG, "--output", root / "lora", *FAST, *LORA)
    return root


def test_full_run_final_loads_in_diffusers_and_moved(runs):
    from diffusers import ZImageTransformer2DModel

    from srpo.models.z_image_tiny import build_tiny_z_image

    check_full_run(runs / "full", ZImageTransformer2DModel, build_tiny_z_image(seed=0).transformer.state_dict())


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
    check_sample(runs / "full", tmp_path / "s")


def test_plan_sizes_the_config(capsys):
    from srpo.cli import main

    assert main(["plan", str(CONFIG)]) == 0  # the CLI's own entry point, in process
    out = capsys.readouterr().out
    assert "model: tiny Z-Image" in out and "total" in out
