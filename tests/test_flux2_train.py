"""FLUX.2 end to end through the real CLI: `srpo train configs/tiny-flux2.yaml` (FLUX.2 [dev] full;
FLUX.2 [klein] LoRA under true CFG), final/ loads with diffusers' Flux2Transformer2DModel, the LoRA
file loads with Flux2KleinPipeline's load_lora_weights and reproduces the merged model's images
(FLUX.2 [dev] adapters are checked against Flux2Pipeline's loader in test_flux2.py), `srpo sample`
renders the run, `srpo plan` sizes the config."""

from pathlib import Path

import pytest
import torch

from family_runs import FAST, LORA, check_full_run, check_sample, srpo

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-flux2.yaml"
FAST = FAST + ["--set", "guard.enabled=false"]  # the reward-hacking guard is tested on its own (tests/test_guard.py)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    srpo("train", CONFIG, "--output", root / "full", *FAST, OMP_NUM_THREADS="1")
    # klein: true CFG 4 in the rollouts, the conditional pass alone in the gradient forward
    srpo("train", CONFIG, "--output", root / "klein", *FAST, *LORA, "--set", "model.name=tiny_flux2_klein",
         "--set", "train.guidance=1.0", OMP_NUM_THREADS="1")
    return root


def test_full_run_final_loads_in_diffusers_and_moved(runs):
    from diffusers import Flux2Transformer2DModel

    from srpo.models.flux2_tiny import build_tiny_flux2

    check_full_run(runs / "full", Flux2Transformer2DModel, build_tiny_flux2(seed=0).transformer.state_dict())


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
    check_sample(runs / "full", tmp_path / "s", OMP_NUM_THREADS="1")


def test_plan_sizes_the_config():
    res = srpo("plan", CONFIG)
    assert "tiny Flux2Pipeline" in res.stdout
