"""Qwen-Image end to end through the real CLI: `srpo train configs/tiny-qwen-image.yaml` (full and
LoRA), final/ loads with diffusers' QwenImageTransformer2DModel, the LoRA file loads with
QwenImagePipeline's load_lora_weights and reproduces the merged model's images, `srpo sample`
renders the run, `srpo plan` sizes the config."""

from pathlib import Path

import pytest
import torch

from family_runs import FAST, LORA, check_full_run, check_sample, srpo

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-qwen-image.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_image")
    srpo("train", CONFIG, "--output", root / "full", *FAST)
    srpo("train", CONFIG, "--output", root / "lora", *FAST, *LORA)
    return root


def test_full_run_final_loads_in_diffusers_and_moved(runs):
    from diffusers import QwenImageTransformer2DModel

    from srpo.models.qwen_image_tiny import build_tiny_qwen_image

    check_full_run(runs / "full", QwenImageTransformer2DModel, build_tiny_qwen_image(seed=0).transformer.state_dict())


def test_lora_file_loads_in_the_pipeline_and_reproduces_the_merged_model(runs):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    from srpo.models.qwen_image import pack, trim_text
    from srpo.models.qwen_image_tiny import build_tiny_qwen_image
    from srpo.sampling import rollout

    run = runs / "lora"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    base = build_tiny_qwen_image(seed=0)
    pipe = base.pipeline()
    prompts = ["a red cube on a table", "a blue ball"]
    noise = torch.randn(base.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(4))
    cond = base.encode_prompts(prompts)
    before = base.pipeline_images(cond, noise, 4, 4.0)
    pipe.load_lora_weights(str(run / "lora"))  # diffusers' own loader, on the base weights
    assert isinstance(pipe, QwenImagePipeline)
    e, m = trim_text(cond["prompt_embeds"], cond["prompt_embeds_mask"])
    ne, nm = trim_text(cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
    with_lora = pipe(prompt_embeds=e, prompt_embeds_mask=m, negative_prompt_embeds=ne,
                     negative_prompt_embeds_mask=nm, latents=pack(noise), height=32, width=32,
                     num_inference_steps=4, true_cfg_scale=4.0, max_sequence_length=base.max_sequence_length,
                     output_type="pt").images
    merged = build_tiny_qwen_image(seed=0)
    merged.transformer = QwenImageTransformer2DModel.from_pretrained(str(run / "final"), local_files_only=True)
    ours = merged.decode(rollout(merged, cond, noise, steps=4, guidance=4.0))
    assert (with_lora - ours).abs().max() < 1e-4
    assert (with_lora - before).abs().max() > 1e-3  # the adapters really change the images


def test_sample_renders_the_qwen_image_run(runs, tmp_path):
    check_sample(runs / "full", tmp_path / "s")


def test_plan_sizes_the_tiny_config(capsys):
    from srpo.cli import main

    assert main(["plan", str(CONFIG)]) == 0  # the CLI's own entry point, in this process
    out = capsys.readouterr().out
    assert "tiny Qwen-Image" in out and "fits in" in out
