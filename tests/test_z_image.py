"""What is particular to the Z-Image family: prompt encoding, the transformer's time and inputs, the
base variant's true CFG and its options (normalisation, truncation) against ZImagePipeline, Turbo
ignoring guidance, latent normalisation, family errors, LoRA layer names, the flagship's plan
sizes. The contract every family meets is tests/test_family_contract.py (its twin is Turbo)."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

from family_runs import (check_cfg_gradient, check_one_line_errors, inputs_fixture, matched_linears,
                         twin_fixture)
from srpo.errors import UserError
from srpo.models.z_image import QWEN3_4B, QWEN3_4B_PARAMS, ZImageModel
from srpo.models.z_image_tiny import TinyZImageModel, save_tiny_z_image, tiny_qwen_tokenizer
from srpo.sampling import rollout

PROMPTS = ["a red cube on a table", "a small blue ball in the grass at sunset"]
H, W, STEPS, CFG = 32, 48, 4, 4.0  # CFG 4 here is ZImagePipeline's guidance_scale 3
CPU = torch.device("cpu")


def split(cond):
    pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
    neg = {k[len("negative_"):]: v for k, v in cond.items() if k.startswith("negative_")}
    return pos, neg


saved = twin_fixture(save_tiny_z_image, variant="base")


@pytest.fixture(scope="module")
def turbo(saved):
    _, m = saved  # the same modules, the distilled variant's rules
    return ZImageModel(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, variant="turbo",
                       max_sequence_length=m.max_sequence_length)

inputs = inputs_fixture(PROMPTS, H, W)


@pytest.fixture(scope="module")
def base_images(saved, inputs):
    _, model = saved
    noise, cond = inputs
    return model.pipeline_images(cond, noise, STEPS, CFG)


def test_the_variant_sets_guidance(saved, turbo):
    _, base = saved
    assert (turbo.guidance_mode, turbo.default_guidance) == ("none", 1.0)
    assert (base.guidance_mode, base.default_guidance) == ("cfg", 5.0) and base.cfg_batched


def test_encode_prompts_equal_pipeline_encode_prompt(saved, turbo, inputs):
    _, model = saved
    _, cond = inputs
    pipe = model.pipeline()
    pos, neg = pipe.encode_prompt(list(PROMPTS), device=CPU, do_classifier_free_guidance=True,
                                  max_sequence_length=model.max_sequence_length)
    assert set(cond) == {"prompt_embeds", "prompt_mask", "negative_prompt_embeds", "negative_prompt_mask"}
    lengths = cond["prompt_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1] and cond["prompt_embeds"].shape == (2, model.max_sequence_length, 32)
    for key, ref in (("", pos), ("negative_", neg)):
        mask = cond[key + "prompt_mask"]
        assert len(ref) == 2 and all(torch.equal(r, e[m]) for r, e, m in zip(ref, cond[key + "prompt_embeds"], mask))
        assert not cond[key + "prompt_embeds"][~mask].any()  # zeros past each prompt
    # the template: <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n, no think block
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    # the distilled variant has no negative branch; prompt features are the same
    plain = turbo.encode_prompts(PROMPTS)
    assert set(plain) == {"prompt_embeds", "prompt_mask"} and torch.equal(plain["prompt_embeds"], cond["prompt_embeds"])
    # a non-empty negative prompt, as encode_prompt's negative_prompt (cached per batch size)
    model.negative_prompt = "blurry, low quality"
    try:
        mine = model.encode_prompts(PROMPTS)
        _, ref = pipe.encode_prompt(list(PROMPTS), device=CPU, negative_prompt=["blurry, low quality"] * 2,
                                    max_sequence_length=model.max_sequence_length)
        assert all(torch.equal(r, e[m]) for r, e, m in
                   zip(ref, mine["negative_prompt_embeds"], mine["negative_prompt_mask"]))
        assert mine["negative_prompt_mask"].sum() > cond["negative_prompt_mask"].sum()
    finally:
        model.negative_prompt = ""


def test_prompts_encoded_alone_concatenate_to_the_batch(saved, inputs):
    _, model = saved
    _, cond = inputs
    alone = [model.encode_prompts([p]) for p in PROMPTS]
    for k, v in cond.items():
        assert torch.allclose(torch.cat([a[k] for a in alone]).float(), v.float(), atol=1e-6), k


def _pipeline_sigmas(model, steps):
    """The sigmas ZImagePipeline.__call__ itself sets (read off its scheduler after a call)."""
    pipe = model.pipeline()
    cond = model.encode_prompts(PROMPTS[:1])
    noise = torch.zeros(model.latent_shape(1, H, W))
    pipe(prompt_embeds=model._unpad(cond), latents=noise, height=H, width=W, num_inference_steps=steps,
         guidance_scale=0.0, output_type="latent")
    return pipe.scheduler.sigmas.double()


def test_schedule_equals_the_pipelines_sigmas(saved):
    _, model = saved
    for steps in (4, 9):
        sigmas = model.schedule(steps, H, W)
        assert torch.equal(sigmas, _pipeline_sigmas(model, steps))
        assert sigmas[0] == 1 and sigmas[-1] == 0 and len(sigmas) == steps + 1
    s = torch.linspace(1, 1 / 4, 4, dtype=torch.float32).double()  # the pipeline's own grid, shift 3
    assert torch.allclose(model.schedule(4, H, W)[:-1], 3 * s / (1 + 2 * s), atol=1e-6)
    m = model
    shifted = ZImageModel(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, shift=1.5,
                          max_sequence_length=m.max_sequence_length)  # an override reaches the pipeline too
    assert torch.equal(shifted.schedule(4, H, W), _pipeline_sigmas(shifted, 4))
    assert not torch.equal(shifted.schedule(4, H, W), model.schedule(4, H, W))
    dynamic = ZImageModel(m.transformer, m.vae, m.text_encoder, m.tokenizer,
                          FlowMatchEulerDiscreteScheduler.from_config(m.scheduler.config, use_dynamic_shifting=True),
                          max_sequence_length=m.max_sequence_length)  # the pipeline's mu from the image size
    assert torch.equal(dynamic.schedule(4, H, W), _pipeline_sigmas(dynamic, 4))
    assert not torch.equal(dynamic.schedule(4, H, W), dynamic.schedule(4, 4 * H, 4 * W))


def test_the_transformer_gets_the_pipelines_timesteps_and_inputs(saved, inputs):
    """Every transformer call of the rollout equals the pipeline's: timestep (1000 - t) / 1000,
    the [C, 1, h, w] latents and the unpadded per-prompt embeddings, in one batched CFG call."""
    _, model = saved
    noise, cond = inputs
    calls = []

    def hook(module, args):
        x, t, caps = args
        calls.append((torch.stack(x), t.clone(), [c.clone() for c in caps]))

    handle = model.transformer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            rollout(model, cond, noise, STEPS, CFG)
        ours, calls[:] = list(calls), []
        model.pipeline_images(cond, noise, STEPS, CFG)
        theirs = list(calls)
    finally:
        handle.remove()
    assert len(ours) == len(theirs) == STEPS
    sigmas = model.schedule(STEPS, H, W)[:-1].float()
    for i, ((x, t, caps), (x_p, t_p, caps_p)) in enumerate(zip(ours, theirs)):
        # the pipeline batches [positive, negative]; srpo's velocity batches [negative, positive]
        assert torch.equal(t, t_p) and torch.equal(t, (1000 - sigmas[i] * 1000).expand(4) / 1000)
        assert x.shape == (4, 4, 1, 16, 24) and torch.allclose(x, x_p.roll(2, 0), atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(caps, caps_p[2:] + caps_p[:2]))
    assert abs(theirs[0][1][0].item() - 0.0) < 1e-7  # sigma 1 is the transformer's time 0


def test_cfg_one_pass_at_scale_one_and_by_hand_at_four(saved, turbo, inputs):
    _, model = saved
    noise, cond = inputs
    sigma = torch.tensor([0.3, 0.8])
    pos, neg = split(cond)
    calls = []
    hook = model.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            v_c, v_u = model.predict(noise, sigma, pos, None), model.predict(noise, sigma, neg, None)
            calls.clear()
            v1 = model.velocity(noise, sigma, cond, 1.0)
            assert len(calls) == 1 and torch.equal(v1, v_c.float())
            v4 = model.velocity(noise, sigma, cond, 4.0)
            assert len(calls) == 2  # both CFG passes in one batched call, as the pipeline makes them
            calls.clear()
            t4 = turbo.velocity(noise, sigma, pos, 4.0)  # the distilled variant ignores guidance
            assert len(calls) == 1 and torch.equal(t4, v_c.float())
    finally:
        hook.remove()
    assert torch.allclose(v4, v_c + 3.0 * (v_c - v_u), atol=1e-5)  # the pipeline's pos + g (pos - neg), g = 3
    assert (v_c - v_u).abs().max() > 1e-3  # the negative branch really differs
    # the velocity is eps - x0: the negated transformer output at time 1 - sigma
    with torch.no_grad():
        raw = model.transformer(list(noise.unsqueeze(2).unbind(0)), 1 - sigma, model._unpad(pos), return_dict=False)[0]
    # (1 - sigma against the pipeline's (1000 - 1000 sigma) / 1000: rounding only)
    assert torch.allclose(v_c, -torch.stack(raw).squeeze(2), atol=1e-4)


def test_cfg_normalization_caps_each_samples_norm(saved):
    _, model = saved
    v_c = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    v_u = v_c.clone()
    v_u[0] = -v_u[0]  # sample 0: the guided norm grows 7x; sample 1: unchanged
    model.cfg_normalization = 1.5
    try:
        out = model.combine_cfg(v_c, v_u, 4.0)
    finally:
        model.cfg_normalization = 0.0
    assert torch.allclose(out[0].norm(), 1.5 * v_c[0].norm()) and torch.allclose(out[0], v_c[0] * 1.5, atol=1e-6)
    assert torch.equal(out[1], v_c[1])
    assert torch.allclose(model.combine_cfg(v_c, v_u, 4.0)[0], 7 * v_c[0])


def test_rollout_and_decode_equal_the_pipeline(saved, turbo, inputs, base_images):
    _, model = saved
    noise, cond = inputs
    with torch.no_grad():
        images = model.decode(rollout(model, cond, noise, STEPS, CFG))
    assert images.shape == base_images.shape == (2, 3, H, W) and base_images.dtype == torch.float32
    assert (images - base_images).abs().max() < 1e-4
    assert (images[0] - images[1]).abs().max() > 0.05  # two prompts (and noises), two images
    without_cfg = model.pipeline_images(cond, noise, STEPS, 1.0)
    assert (without_cfg - base_images).abs().max() > 1e-3
    # Turbo: the pipeline at guidance_scale 0, whatever guidance srpo is given
    pos, _ = split(cond)
    turbo_ref = turbo.pipeline_images(pos, noise, 6, CFG)
    with torch.no_grad():
        turbo_images = turbo.decode(rollout(turbo, pos, noise, 6, CFG))
    assert (turbo_images - turbo_ref).abs().max() < 1e-4
    assert (turbo_ref - model.pipeline_images(cond, noise, 6, 1.0)).abs().max() < 1e-6


@pytest.mark.parametrize("options", [{"cfg_normalization": 1.0}, {"cfg_truncation": 0.3}])
def test_the_pipelines_cfg_options_are_reproduced(saved, inputs, base_images, options):
    _, m = saved
    noise, cond = inputs
    model = ZImageModel(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, variant="base",
                        max_sequence_length=m.max_sequence_length, **options)
    ref = model.pipeline_images(cond, noise, STEPS, 6.0)
    with torch.no_grad():
        images = model.decode(rollout(model, cond, noise, STEPS, 6.0))
        default = m.decode(rollout(m, cond, noise, STEPS, 6.0))
    assert (images - ref).abs().max() < 1e-4
    assert (images - default).abs().max() > 1e-3  # the option changes the images
    if "cfg_truncation" in options:  # per-sample levels: CFG off exactly where 1 - sigma > 0.3 (the 4th step)
        sigma = torch.tensor([0.3, 0.8])
        with torch.no_grad():
            v = model.velocity(noise, sigma, cond, 6.0)
            v_1, v_6 = m.velocity(noise, sigma, cond, 1.0), m.velocity(noise, sigma, cond, 6.0)
        assert torch.allclose(v[0], v_1[0], atol=1e-6) and torch.allclose(v[1], v_6[1], atol=1e-6)


@pytest.mark.parametrize("mode", ["both", "cond"])
def test_cfg_gradient_flows_through_the_passes_the_setting_names(saved, inputs, mode):
    """The base variant's true CFG (the twin the contract suite runs is Turbo, without CFG)."""
    _, model = saved
    noise, cond = inputs
    check_cfg_gradient(model, noise, cond, mode)


def test_latent_size_is_capped_by_the_rope_table(saved):
    _, model = saved
    assert model.latent_shape(2, H, W) == (2, 4, 16, 24)
    with pytest.raises(UserError, match="too large"):
        model.latent_shape(1, 4 * 65, 32)


def test_incompatible_parts_are_one_line_errors(saved):
    _, m = saved
    bad = ZImageTransformer2DModel(in_channels=8, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                   cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[128, 64, 64])
    cases = [(lambda: ZImageModel(bad, m.vae, m.text_encoder, m.tokenizer, m.scheduler),
              "in_channels = 8 but vae latent_channels = 4"),
             (lambda: ZImageModel(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler,
                                  max_sequence_length=200), "too long for this transformer"),
             (lambda: ZImageModel(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, variant="dev"),
              "unknown variant 'dev'")]
    check_one_line_errors(cases)


def test_saved_folder_keeps_the_qwen3_parts_and_loads_as_turbo(saved):
    path, model = saved
    index = json.loads((path / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "Qwen3Model"] and index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    loaded = ZImageModel.load(path, variant="base", max_sequence_length=model.max_sequence_length)
    assert type(loaded.tokenizer).__name__ == "Qwen2Tokenizer"
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    assert ZImageModel.load(path, max_sequence_length=64).guidance_mode == "none"  # turbo unless told otherwise


def test_family_load_errors_are_one_line(saved, tmp_path):
    """The Z-Image-specific ones (the contract suite checks the errors every family gives)."""
    path, _ = saved
    omni = tmp_path / "omni"
    omni.mkdir()
    index = json.loads((path / "model_index.json").read_text())
    (omni / "model_index.json").write_text(json.dumps({**index, "_class_name": "ZImageOmniPipeline"}))
    cases = [
        (lambda: ZImageModel.load(path, variant="distilled"), "unknown variant 'distilled'"),
        (lambda: ZImageModel.load(omni), "holds a ZImageOmniPipeline pipeline, not ZImagePipeline"),
        (lambda: TinyZImageModel.load(depth=3), "bad option for model 'tiny_z_image'"),
        (lambda: TinyZImageModel.load(axes_dims=(4, 4, 4)), "must sum to the head width"),
    ]
    check_one_line_errors(cases)


def test_lora_targets_reach_the_refiners_and_the_main_layers(saved):
    """Z-Image's LoRA reaches its noise and context refiners beside the main layers (the contract
    suite loads the adapters in the pipeline)."""
    _, model = saved
    adapted = matched_linears(model.transformer, sorted(ZImageModel.lora_targets))
    assert {n.split(".")[0] for n in adapted} == {"layers", "noise_refiner", "context_refiner"}
    assert any(n.endswith(".attention.to_out.0") for n in adapted)


def test_plan_parts_sizes():
    from transformers import Qwen3Config, Qwen3Model

    big = ZImageModel.plan_parts(None, {}, 1024, 1024)
    assert big.name == "Z-Image-Turbo" and big.image_tokens == 64 * 64 and big.text_tokens == 512
    assert next(big.transformer.parameters()).device.type == "meta"
    assert sum(p.numel() for p in big.transformer.parameters()) == 6_154_908_736  # "6B"
    with torch.device("meta"):
        assert sum(p.numel() for p in Qwen3Model(Qwen3Config(**QWEN3_4B)).parameters()) == QWEN3_4B_PARAMS
    assert big.text_encoders == QWEN3_4B_PARAMS
    assert big.vae_config == {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
                              "latent_channels": 16}
    other = ZImageModel.plan_parts(None, {"variant": "base"}, 768, 1344)
    assert other.name == "Z-Image" and other.image_tokens == 48 * 84
    for bad in ({"foo": 1}, {"variant": "dev"}):
        with pytest.raises(UserError):
            ZImageModel.plan_parts(None, bad, 1024, 1024)


def test_tiny_tokenizer_is_the_same_every_build():
    from srpo.models.z_image_tiny import _build_tokenizer

    assert _build_tokenizer(640).get_vocab() == tiny_qwen_tokenizer().get_vocab()
