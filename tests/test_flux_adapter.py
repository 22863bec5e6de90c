"""The FLUX adapter: saving / loading round trips, parity with FluxPipeline's own helpers,
gradients, and clear errors for bad folders."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
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
        # per-sample levels: row i equals a batch-1 call at sigma[i]; guidance is really used
        v1 = model.velocity(latents[1:], sigma[1], {k: t[1:] for k, t in cond.items()}, 3.5)
        assert (v[1:] - v1).abs().max() < 1e-5
        assert (model.velocity(latents, sigma, cond, 1.0) - v).abs().max() > 1e-3


def test_saved_folder_round_trip_gives_identical_model(saved, inputs):
    path, model = saved
    latents, sigma, cond = inputs
    loaded = FluxModel.load(path, max_sequence_length=model.max_sequence_length)
    with torch.no_grad():
        assert all(torch.equal(cond[k], t) for k, t in loaded.encode_prompts(PROMPTS).items())
        v = model.velocity(latents, sigma, cond, 3.5)
        assert torch.equal(loaded.velocity(latents, sigma, cond, 3.5), v)
        assert torch.equal(loaded.decode(latents), model.decode(latents))
        # a different seed is a different model: the comparison above can fail
        other = build_tiny_flux(seed=1)
        assert (other.velocity(latents, sigma, cond, 3.5) - v).abs().max() > 1e-3
    # diffusers itself loads the folder offline too, with the tiny model's components
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    assert type(pipe.tokenizer_2).__name__ == "CLIPTokenizer"
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert not any(path.rglob("*.bin")) and any(path.rglob("*.safetensors"))


def test_save_transformer_loads_in_diffusers_and_via_transformer_path(saved, inputs, tmp_path):
    path, model = saved
    latents, sigma, cond = inputs
    tuned = build_tiny_flux(seed=0)
    with torch.no_grad():
        for p in tuned.transformer.parameters():  # a "fine-tuned" transformer
            p.add_(0.05 * torch.randn_like(p))
    tuned.save_transformer(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors").is_file()
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "ckpt")
    for (n, a), (_, b) in zip(tuned.transformer.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        want = tuned.velocity(latents, sigma, cond, 3.5)
        assert (want - model.velocity(latents, sigma, cond, 3.5)).abs().max() > 1e-3
        for loaded in (
            FluxModel.load(path, transformer_path=tmp_path / "ckpt", max_sequence_length=64),
            MODELS.get("tiny_flux").load(path=None, seed=0, transformer_path=str(tmp_path / "ckpt")),
        ):
            assert torch.equal(loaded.velocity(latents, sigma, cond, 3.5), want)


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
    assert x.shape == (2, 3, 32, 48) and x.min() >= 0 and x.max() <= 1
    with torch.no_grad():
        ref = pipe.vae.decode(z / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    assert torch.allclose(x, pipe.image_processor.postprocess(ref, output_type="pt"), atol=1e-6)
    with pytest.raises(UserError, match="multiples of 4"):
        model.latent_shape(1, 30, 32)


def test_gradients_reach_only_the_transformer(saved, inputs):
    _, model = saved
    latents, sigma, cond = inputs
    model.transformer.zero_grad(set_to_none=True)
    z = latents.clone().requires_grad_(True)
    pixels = model.decode(z + model.velocity(z, sigma, cond, 3.5))
    pixels.square().mean().backward()
    grads = [p.grad for p in model.transformer.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert z.grad is not None and z.grad.abs().sum() > 0  # decode is differentiable
    for part in (model.vae, model.text_encoder, model.text_encoder_2):
        assert not any(p.requires_grad or p.grad is not None for p in part.parameters())
        assert not part.training
    model.transformer.zero_grad(set_to_none=True)


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


def test_tiny_builder_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = build_tiny_flux(seed=0), build_tiny_flux(seed=0), build_tiny_flux(seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = (m.transformer.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert sum(p.numel() for p in a.transformer.parameters()) < 200_000


def test_registry_factories():
    assert MODELS.get("flux") is FluxModel
    m = MODELS.get("tiny_flux").load(path=None, seed=0, transformer_path=None, device="cpu", dtype="bfloat16",
                                num_single_layers=2)
    assert m.dtype == torch.bfloat16 and m.vae.dtype == torch.bfloat16
    assert len(m.transformer.single_transformer_blocks) == 2
    with pytest.raises(UserError, match="takes no path"):
        MODELS.get("tiny_flux").load(path="some/folder")
    with pytest.raises(UserError, match="bad option"):
        MODELS.get("tiny_flux").load(no_such_size=3)
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        MODELS.get("tiny_flux").load(dtype="float8")


def test_bad_folders_raise_user_errors(saved, tmp_path):
    path, _ = saved
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=str(missing)):
        FluxModel.load(missing)
    with pytest.raises(UserError, match="needs a path"):
        FluxModel.load(None)
    with pytest.raises(UserError, match="unknown option"):
        FluxModel.load(str(path), lora_rank=4)

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match=r"lacks vae/"):
        FluxModel.load(broken)

    index = json.loads((path / "model_index.json").read_text())
    sd3 = tmp_path / "sd3"
    shutil.copytree(path, sd3)
    (sd3 / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UserError, match="StableDiffusion3Pipeline pipeline, not Flux"):
        FluxModel.load(sd3)

    with pytest.raises(UserError, match="not a FluxTransformer2DModel"):
        FluxModel.load(path, transformer_path=path / "vae")
    wide = build_tiny_flux(seed=0, latent_channels=8)
    wide.save_transformer(tmp_path / "wide")
    with pytest.raises(UserError, match="in_channels = 32 but 4 x vae latent_channels = 16"):
        FluxModel.load(path, transformer_path=tmp_path / "wide")

    empty = tmp_path / "empty_weights"
    shutil.copytree(path, empty)
    (empty / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=str(empty)):
        FluxModel.load(empty)
