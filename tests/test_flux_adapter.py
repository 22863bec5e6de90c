"""What is particular to the FLUX adapter: the transformer called as FluxPipeline calls it, the
reference schedule of the tiny folder, FLUX's latent normalisation against diffusers' own image
processor and VAE, gradient checkpointing, family errors. The contract every family meets is
tests/test_family_contract.py."""

import shutil

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

from srpo.errors import UserError
from srpo.models import MODELS
from srpo.models.flux import FluxModel
from srpo.models.tiny import build_tiny_flux, save_tiny_flux

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "flux"
    model = save_tiny_flux(path, seed=0)
    return path, model


@pytest.fixture(scope="module")
def inputs(saved):
    _, model = saved
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(model.latent_shape(2, 32, 48), generator=gen)
    return latents, torch.tensor([0.3, 0.8]), model.encode_prompts(PROMPTS)


def test_velocity_matches_transformer_called_like_flux_pipeline(saved, inputs):
    _, model = saved
    latents, sigma, cond = inputs
    pipe = model.pipeline()
    h, w = latents.shape[-2:]
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, prompt_2=None,
                                                  max_sequence_length=model.max_sequence_length)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["pooled_prompt_embeds"], pooled)
    with torch.no_grad():
        ref = pipe.transformer(
            hidden_states=pipe._pack_latents(latents, 2, 4, h, w), timestep=sigma,
            guidance=torch.full([2], 3.5), pooled_projections=pooled, encoder_hidden_states=embeds,
            txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False)[0]
        ref = pipe._unpack_latents(ref, 32, 48, pipe.vae_scale_factor)
        v = model.velocity(latents, sigma, cond, 3.5)
        assert v.shape == latents.shape
        assert (v - ref).abs().max() < 1e-5


def test_saved_folder_keeps_the_reference_schedule(saved):
    """The tiny folder's scheduler is the reference trainer's fixed shift 3, and diffusers reads it."""
    path, _ = saved
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    assert type(pipe.tokenizer_2).__name__ == "CLIPTokenizer"
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting


def test_encode_decode_shapes_and_flux_normalisation(saved):
    _, model = saved
    pipe = model.pipeline()
    assert model.latent_shape(2, 32, 48) == (2, 4, 16, 24)
    pixels = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    z = model.encode(pixels)
    assert z.shape == model.latent_shape(2, 32, 48)
    # reference: diffusers' image processor + Flux img2img's VAE encoding (posterior mode)
    with torch.no_grad():
        raw = retrieve_latents(pipe.vae.encode(pipe.image_processor.preprocess(pixels)), sample_mode="argmax")
    cfg = pipe.vae.config
    assert cfg.shift_factor != 0 and cfg.scaling_factor != 1
    assert torch.allclose(z, (raw - cfg.shift_factor) * cfg.scaling_factor, atol=1e-6)
    x = model.decode(z)
    assert x.shape == (2, 3, 32, 48)
    with torch.no_grad():
        ref = pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    assert torch.allclose(x, pipe.image_processor.postprocess(ref, output_type="pt"), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(saved, inputs):
    _, model = saved
    latents, sigma, cond = inputs

    def grads():
        model.transformer.zero_grad(set_to_none=True)
        model.decode(model.velocity(latents, sigma, cond, 3.5)).mean().backward()
        return [p.grad.clone() for p in model.transformer.parameters()]

    plain = grads()
    model.gradient_checkpointing(True)
    try:
        assert model.transformer.gradient_checkpointing
        checkpointed = grads()
    finally:
        model.gradient_checkpointing(False)
        model.transformer.zero_grad(set_to_none=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_tiny_flux_takes_its_block_counts():
    m = MODELS.get("tiny_flux").load(seed=0, num_single_layers=2)
    assert len(m.transformer.single_transformer_blocks) == 2 and len(m.transformer.transformer_blocks) == 1


def test_family_folder_errors(saved, tmp_path):
    """The FLUX-specific ones (the contract suite checks the errors every family gives)."""
    path, _ = saved
    wide = build_tiny_flux(seed=0, latent_channels=8)
    wide.save_transformer(tmp_path / "wide")
    with pytest.raises(UserError, match="in_channels = 32 but 4 x vae latent_channels = 16"):
        FluxModel.load(path, transformer_path=tmp_path / "wide")
    empty = tmp_path / "empty_weights"
    shutil.copytree(path, empty)
    (empty / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=str(empty)) as e:
        FluxModel.load(empty)
    assert "\n" not in str(e.value)
