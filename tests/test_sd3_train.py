"""SD3 end to end through the real CLI: `srpo train configs/tiny-sd3.yaml` (full and LoRA), final/
loads with diffusers' SD3Transformer2DModel, the LoRA file loads with StableDiffusion3Pipeline's
load_lora_weights and reproduces the merged model's images, `srpo sample` renders the run."""

from pathlib import Path

import pytest
import torch

from family_runs import FAST, LORA, check_full_run, check_sample, srpo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    srpo("train", ROOT / "configs" / "tiny-sd3.yaml", "--output", root / "full", *FAST)
    srpo("train", ROOT / "configs" / "tiny-sd3.yaml", "--output", root / "lora", *FAST, *LORA)
    return root


def test_full_run_final_loads_in_diffusers_and_moved(runs):
    from diffusers import SD3Transformer2DModel

    from srpo.models.sd3_tiny import build_tiny_sd3

    check_full_run(runs / "full", SD3Transformer2DModel, build_tiny_sd3(seed=0).transformer.state_dict())


def test_lora_file_loads_in_the_pipeline_and_reproduces_the_merged_model(runs):
    from diffusers import SD3Transformer2DModel

    from srpo.models.sd3_tiny import build_tiny_sd3
    from srpo.sampling import rollout

    run = runs / "lora"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    base = build_tiny_sd3(seed=0)
    pipe = base.pipeline()
    prompts = ["a red cube on a table", "a blue ball"]
    noise = torch.randn(base.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(4))
    cond = base.encode_prompts(prompts)
    before = base.pipeline_images(cond, noise, 4, 4.0)
    pipe.load_lora_weights(str(run / "lora"))  # diffusers' own loader, on the base weights
    with_lora = pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                     pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                     negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"], latents=noise,
                     height=32, width=32, num_inference_steps=4, guidance_scale=4.0, output_type="pt").images
    merged = build_tiny_sd3(seed=0)
    merged.transformer = SD3Transformer2DModel.from_pretrained(str(run / "final"), local_files_only=True)
    ours = merged.decode(rollout(merged, cond, noise, steps=4, guidance=4.0))
    assert (with_lora - ours).abs().max() < 1e-4
    assert (with_lora - before).abs().max() > 1e-3  # the adapters really change the images


def test_sample_renders_the_sd3_run(runs, tmp_path):
    check_sample(runs / "full", tmp_path / "s")
