"""What is particular to the FLUX.2 families (FLUX.2 [dev], embedded guidance; FLUX.2 [klein], true
CFG or distilled): prompt encoding and templates, the empirical-mu schedule, how guidance reaches
the transformer, latent normalisation, the distilled variant, family errors, LoRA layer names,
the flagships' plan sizes. The contract every family meets (rollout parity, round trips, LoRA in
the pipeline, folder errors, twin determinism) is tests/test_family_contract.py."""

import json

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

from family_runs import check_one_line_errors, matched_linears
from srpo.errors import UserError
from srpo.models import flux2 as F
from srpo.models import flux2_tiny as FT
from srpo.models import flux2_klein as FK
from srpo.models.flux2 import Flux2Model
from srpo.models.flux2_klein import Flux2KleinModel
from srpo.models.flux2_tiny import (TinyFlux2KleinModel, TinyFlux2Model, build_tiny_flux2, build_tiny_flux2_klein,
                                    save_tiny_flux2)
from srpo.sampling import rollout

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
H, W, STEPS, G = 32, 48, 4, 4.0
PIPES = {"dev": Flux2Pipeline, "klein": Flux2KleinPipeline}
MODEL = {"dev": Flux2Model, "klein": Flux2KleinModel}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {v: (root / v, save_tiny_flux2(root / v, seed=0, klein=v == "klein")) for v in ("dev", "klein")}


@pytest.fixture(scope="module")
def inputs(saved):
    noise = torch.randn(saved["dev"][1].latent_shape(2, H, W), generator=torch.Generator().manual_seed(1))
    return noise, {v: m.encode_prompts(PROMPTS) for v, (_, m) in saved.items()}


def pos_neg(cond):
    return ({k: v for k, v in cond.items() if not k.startswith("negative_")},
            {k[len("negative_"):]: v for k, v in cond.items() if k.startswith("negative_")})


def test_guidance_mode_follows_the_transformer_and_the_distilled_flag(saved):
    """[dev] embeds guidance (its transformer has a guidance embedding), [klein] runs true CFG in
    two passes, a distilled [klein] ignores guidance: read off the built parts, not set per class."""
    dev, klein = saved["dev"][1], saved["klein"][1]
    assert dev.guidance_mode == "embedded" and dev.transformer.config.guidance_embeds
    assert klein.guidance_mode == "cfg" and not klein.transformer.config.guidance_embeds and not klein.cfg_batched
    distilled = build_tiny_flux2_klein(seed=0, is_distilled=True)
    assert distilled.guidance_mode == "none" and distilled.default_guidance == 1.0


def test_encode_prompts_equal_pipeline_encode_prompt(saved, inputs):
    _, cond = inputs
    for v, (_, model) in saved.items():
        ref, ids = model.pipeline().encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                  max_sequence_length=model.max_sequence_length,
                                                  text_encoder_out_layers=model.text_encoder_out_layers)
        assert torch.equal(cond[v]["prompt_embeds"], ref), v
        assert ref.shape == (2, model.max_sequence_length, 3 * 16) and ids.shape == (2, model.max_sequence_length, 4)
        assert not torch.equal(ref[0], ref[1])
    # klein: the negative branch is the pipeline's own encode_prompt of "" (or of negative_prompt)
    klein = saved["klein"][1]
    pipe = klein.pipeline()
    for negative in ("", "blurry, low quality"):
        klein.negative_prompt = negative
        try:
            mine = klein.encode_prompts(PROMPTS)
        finally:
            klein.negative_prompt = ""
        ref = pipe.encode_prompt([negative] * 2, device=torch.device("cpu"),
                                 max_sequence_length=klein.max_sequence_length,
                                 text_encoder_out_layers=klein.text_encoder_out_layers)[0]
        assert torch.equal(mine["negative_prompt_embeds"], ref), negative
    assert "negative_prompt_embeds" not in cond["dev"]
    assert "negative_prompt_embeds" not in build_tiny_flux2_klein(is_distilled=True).encode_prompts(PROMPTS)


def test_prompt_templates_are_the_pipelines(saved):
    """What the text encoders read: dev's Mistral chat turns with the pipeline's system message
    ([IMG] removed from the prompt), klein's Qwen3 turn with the empty thinking block."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    dev, klein = saved["dev"][1], saved["klein"][1]
    seen = {}
    hook = dev.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        dev.encode_prompts(["a red [IMG]cube"])
    finally:
        hook.remove()
    text = dev.tokenizer.tokenizer.decode(seen["input_ids"][0][seen["attention_mask"][0].bool()])
    assert text == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a red cube[/INST]"
    assert seen["input_ids"].shape == (1, dev.max_sequence_length) and seen["use_cache"] is False
    hook = klein.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        klein._encode(["a red cube"])
    finally:
        hook.remove()
    text = klein.tokenizer.decode(seen["input_ids"][0][seen["attention_mask"][0].bool()])
    assert text == "<|im_start|>user\na red cube<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_schedule_follows_the_empirical_mu_of_the_image_size(saved):
    """FLUX.2's resolution-dependent shift, both branches of its fit (the contract suite checks the
    schedule against the pipeline's own call)."""
    model = saved["dev"][1]
    for n in (100, 1024, 4096, 4300, 4301, 16384):
        for steps in (4, 28, 50):
            assert F.empirical_mu(n, steps) == compute_empirical_mu(n, steps)
    # as __call__ sets them; 256x512 is 8192 tokens, beyond the 4300 where the fit changes
    for steps, (h, w) in ((28, (H, W)), (50, (128, 128)), (8, (256, 512))):
        pipe = model.pipeline()
        n = (h // 4) * (w // 4)
        retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                           mu=compute_empirical_mu(n, steps))
        assert torch.equal(model.schedule(steps, h, w), pipe.scheduler.sigmas.double())
    assert not torch.equal(model.schedule(8, H, W), model.schedule(8, 128, 128))  # resolution-dependent


def test_embedded_guidance_and_timestep_reach_the_transformer(saved, inputs):
    noise, cond = inputs
    model = saved["dev"][1]
    sigma = torch.tensor([0.3, 0.8])
    seen = {}
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            v4 = model.velocity(noise, sigma, cond["dev"], 4.0)
    finally:
        hook.remove()
    assert torch.equal(seen["guidance"], torch.tensor([4.0, 4.0]))
    assert torch.equal(seen["timestep"], (sigma * 1000) / 1000)  # the pipeline's timestep / 1000
    assert seen["hidden_states"].shape == (2, 8 * 12, 16) and seen["img_ids"].shape == (96, 4)
    assert seen["img_ids"][13].tolist() == [0, 1, 1, 0] and seen["txt_ids"][5].tolist() == [0, 0, 0, 5]
    with torch.no_grad():
        assert torch.equal(v4, model.predict(noise, sigma, cond["dev"], 4.0))
        assert (model.velocity(noise, sigma, cond["dev"], 2.0) - v4).abs().max() > 1e-4  # the embedding acts
    assert not model.quantize_timesteps  # the pipeline's unquantised timestep by default
    model.quantize_timesteps = True
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model.predict(noise, torch.tensor([0.30049, 0.8]), cond["dev"], 4.0)
    finally:
        model.quantize_timesteps = False
        hook.remove()
    assert torch.equal(seen["timestep"], torch.tensor([300.0, 800.0]) / 1000)


def test_distilled_klein_ignores_guidance_and_equals_its_pipeline(inputs):
    noise, _ = inputs
    model = build_tiny_flux2_klein(seed=2, is_distilled=True)
    cond = model.encode_prompts(PROMPTS)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(model.velocity(noise, sigma, cond, 4.0), model.velocity(noise, sigma, cond, 1.0))
        images = model.decode(rollout(model, cond, noise, 3, 4.0))
    assert (images - model.pipeline_images(cond, noise, 3, 4.0)).abs().max() < 1e-4


def test_latent_normalisation_decode_and_encode(saved, inputs):
    model = saved["dev"][1]
    noise, _ = inputs
    vae = model.vae
    mean, var = vae.bn.running_mean, vae.bn.running_var
    assert mean.abs().max() > 0.1 and (var - 1).abs().max() > 0.1  # the tiny VAE's statistics are not trivial
    latents = noise.clone().requires_grad_(True)
    pixels = model.decode(latents)
    pixels.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    std = torch.sqrt(var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    z = F.unpatchify(noise * std + mean.view(1, -1, 1, 1))
    assert z.shape == (2, 4, 16, 24)
    with torch.no_grad():
        assert torch.allclose(pixels, ((vae.decode(z).sample + 1) / 2).clamp(0, 1), atol=1e-6)
    enc = model.encode(pixels.detach())
    assert enc.shape == noise.shape and not enc.requires_grad
    raw = F.patchify(vae.encode(pixels.detach() * 2 - 1).latent_dist.mode())
    assert torch.allclose(enc, (raw - mean.view(1, -1, 1, 1)) / std, atol=1e-6)
    assert torch.equal(F.unpatchify(F.patchify(z)), z)
    assert torch.equal(F.patchify(z), Flux2Pipeline._patchify_latents(z))


def test_incompatible_parts_are_one_line_errors(saved):
    m = saved["dev"][1]
    bad = Flux2Transformer2DModel(in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4))
    with pytest.raises(UserError, match="in_channels = 32 but 4 x vae latent_channels = 16") as e:
        Flux2Model(bad, m.vae, m.text_encoder, m.tokenizer, m.scheduler)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="joint_attention_dim = 48 but 2 stacked layers") as e:
        Flux2Model(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, text_encoder_out_layers=(10, 20))
    with pytest.raises(UserError, match="do not fit this text encoder: it has 31 layers"):
        Flux2Model(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, text_encoder_out_layers=(10, 20, 40))
    with pytest.raises(UserError, match="must be a list of hidden-state indices"):
        Flux2Model(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, text_encoder_out_layers=30)


def test_saved_folders_keep_the_family_settings(saved):
    for v, (path, model) in saved.items():
        loaded = MODEL[v].load(path, max_sequence_length=model.max_sequence_length)
        assert loaded.text_encoder_out_layers == model.text_encoder_out_layers
    assert type(Flux2Model.load(saved["dev"][0]).tokenizer).__name__ == "PixtralProcessor"
    assert json.loads((saved["klein"][0] / "model_index.json").read_text())["is_distilled"] is False


def test_family_load_errors_are_one_line(saved):
    """The FLUX.2-specific ones (the contract suite checks the errors every family gives)."""
    dev = saved["dev"][0]
    cases = [
        (lambda: Flux2Model.load(dev, negative_prompt="x"), "unknown option(s) for model 'flux2': negative_prompt"),
        (lambda: Flux2Model.load(dev, text_encoder_out_layers=[10, 20, 33]), "do not fit this text encoder"),
        (lambda: TinyFlux2Model.load(depth=3), "bad option for model 'tiny_flux2'"),
        (lambda: TinyFlux2Model.load(is_distilled=True), "bad option for model 'tiny_flux2'"),
        (lambda: TinyFlux2KleinModel.load(axes_dims_rope=(4, 4, 4)), "axes_dims_rope"),
    ]
    check_one_line_errors(cases)


def test_lora_targets_reach_the_flux2_layers(saved):
    """FLUX.2's fused single-block projection and its feed-forward names (the contract suite loads
    the adapters in the pipeline)."""
    model = saved["dev"][1]
    adapted = matched_linears(model.transformer, sorted(model.lora_targets))
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
            "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out",
            "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out"} <= adapted
    assert len(adapted) == 14  # every linear of one double and one single block but the modulations
    assert len(Flux2Model.lora_targets) == 13 + 48  # FLUX.2 [dev]'s 48 single blocks


def test_plan_parts_sizes():
    dev = Flux2Model.plan_parts(None, {}, 1024, 1024)
    assert dev.name == "FLUX.2 [dev]" and dev.image_tokens == 64 * 64 and dev.text_tokens == 512
    assert next(dev.transformer.parameters()).device.type == "meta"
    assert sum(p.numel() for p in dev.transformer.parameters()) == 32_223_281_152  # the 32B transformer
    assert dev.text_encoders == F.MISTRAL_SMALL_3_PARAMS == F.count_text_encoder_params()["mistral_small_3"]
    assert abs(dev.text_encoders - 24.0e9) < 0.05e9  # Mistral-Small-3.x 24B
    assert dev.vae_config == {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 32}
    klein = Flux2KleinModel.plan_parts(None, {"max_sequence_length": 256}, 768, 1344)
    assert klein.name == "FLUX.2 [klein] 4B" and klein.image_tokens == 48 * 84 and klein.text_tokens == 256
    assert abs(sum(p.numel() for p in klein.transformer.parameters()) - 3.88e9) < 0.01e9
    assert klein.text_encoders == FK.QWEN3_4B_PARAMS == F.count_text_encoder_params()["qwen3_4b"]
    assert dev.guidance_mode is None and klein.guidance_mode is None  # the classes' modes
    assert TinyFlux2KleinModel.plan_parts(None, {"is_distilled": True}, H, W).guidance_mode == "none"
    with pytest.raises(UserError, match="unknown option"):
        Flux2Model.plan_parts(None, {"foo": 1}, 1024, 1024)


def test_tiny_tokenizer_is_deterministic_and_has_the_mistral_specials():
    assert FT.train_bpe(FT.QWEN_SPECIAL).get_vocab() == FT.train_bpe(FT.QWEN_SPECIAL).get_vocab()
    tok = build_tiny_flux2(seed=0).tokenizer.tokenizer
    assert tok.convert_tokens_to_ids(["<s>", "[INST]", "[IMG]", "<pad>", "[SYSTEM_PROMPT]"]) == [1, 3, 10, 11, 17]
