"""The SD3 / SD3.5 family: parity with StableDiffusion3Pipeline (prompt encoding, schedule, CFG,
the whole sampler), folder round trips and errors, transformer and LoRA export, plan sizes."""

import json

import peft
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from srpo.errors import UserError
from srpo.models import MODELS
from srpo.models.sd3 import SD3Model
from srpo.models.sd3_tiny import TinySD3Model, build_tiny_sd3, save_tiny_sd3
from srpo.sampling import rollout

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
H, W, STEPS, CFG = 32, 48, 4, 4.0
NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "sd3"
    return path, save_tiny_sd3(path, seed=0)


@pytest.fixture(scope="module")
def inputs(saved):
    _, model = saved
    noise = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(1))
    return noise, model.encode_prompts(PROMPTS)


@pytest.fixture(scope="module")
def base_images(saved, inputs):
    _, model = saved
    noise, cond = inputs
    return model.pipeline_images(cond, noise, STEPS, CFG)


def test_registered_classes_and_family_facts():
    assert MODELS.get("sd3") is SD3Model and MODELS.get("tiny_sd3") is TinySD3Model
    assert SD3Model.guidance_mode == "cfg" and SD3Model.pipeline_class == "StableDiffusion3Pipeline"
    assert SD3Model.transformer_class == "SD3Transformer2DModel"


def test_encode_prompts_equal_pipeline_encode_prompt(saved, inputs):
    _, model = saved
    _, cond = inputs
    pipe = model.pipeline()
    ref = pipe.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                             max_sequence_length=model.max_sequence_length)
    assert set(cond) == set(NAMES)
    for name, r in zip(NAMES, ref):
        assert torch.equal(cond[name], r), name
    assert cond["prompt_embeds"].shape == (2, 77 + model.max_sequence_length, 32)
    # a non-empty negative prompt, as encode_prompt's negative_prompt (cached per batch size)
    model.negative_prompt = "blurry, low quality"
    try:
        mine = model.encode_prompts(PROMPTS[:1])
        ref = pipe.encode_prompt(PROMPTS[:1], None, None, device=torch.device("cpu"),
                                 negative_prompt="blurry, low quality",
                                 max_sequence_length=model.max_sequence_length)
        for name, r in zip(NAMES, ref):
            assert torch.equal(mine[name], r), name
        assert not torch.equal(mine["negative_prompt_embeds"], cond["negative_prompt_embeds"][:1])
    finally:
        model.negative_prompt = ""


def test_encode_prompts_without_t5_feed_zeros_like_the_pipeline(saved):
    _, m = saved
    model = SD3Model(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.text_encoder_2, m.tokenizer_2,
                     None, None, m.scheduler, max_sequence_length=16)
    ref = model.pipeline().encode_prompt(PROMPTS, None, None, device=torch.device("cpu"), max_sequence_length=16)
    cond = model.encode_prompts(PROMPTS)
    for name, r in zip(NAMES, ref):
        assert torch.equal(cond[name], r), name
    assert not cond["prompt_embeds"][:, 77:].any()


def test_schedule_equals_pipeline_sigmas(saved):
    _, model = saved
    for steps in (4, 28):
        pipe = model.pipeline()
        retrieve_timesteps(pipe.scheduler, steps, "cpu")
        assert torch.equal(model.schedule(steps, H, W), pipe.scheduler.sigmas.double())
    shifted = build_tiny_sd3(seed=0, shift=1.5)  # a shift override reaches the pipeline too
    pipe = shifted.pipeline()
    retrieve_timesteps(pipe.scheduler, 4, "cpu")
    assert torch.equal(shifted.schedule(4, H, W), pipe.scheduler.sigmas.double())
    assert not torch.equal(shifted.schedule(4, H, W), model.schedule(4, H, W))


def test_schedule_dynamic_shifting_uses_the_pipelines_image_seq_len(saved):
    import srpo.method

    if not hasattr(srpo.method, "dynamic_shift_mu"):
        pytest.skip("srpo.method.dynamic_shift_mu not there yet (FlowModel refactor)")
    _, m = saved
    scheduler = type(m.scheduler).from_config(m.scheduler.config, use_dynamic_shifting=True)
    model = SD3Model(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.text_encoder_2, m.tokenizer_2,
                     m.text_encoder_3, m.tokenizer_3, scheduler, max_sequence_length=m.max_sequence_length)
    pipe = model.pipeline()
    c = pipe.scheduler.config
    seq = (H // model.vae_scale_factor // 2) * (W // model.vae_scale_factor // 2)  # as __call__ computes it
    mu = calculate_shift(seq, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(pipe.scheduler, 4, "cpu", mu=mu)
    assert torch.allclose(model.schedule(4, H, W), pipe.scheduler.sigmas.double(), atol=1e-6)


def test_cfg_one_pass_at_scale_one_and_by_hand_at_four(saved, inputs):
    _, model = saved
    noise, cond = inputs
    sigma = torch.tensor([0.3, 0.8])
    pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
    neg = {k[len("negative_"):]: v for k, v in cond.items() if k.startswith("negative_")}
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
    finally:
        hook.remove()
    assert torch.allclose(v4, v_u + 4.0 * (v_c - v_u), atol=1e-5)  # batched [neg, pos]: float rounding only
    assert (v_c - v_u).abs().max() > 1e-3  # the negative branch really differs


@pytest.mark.parametrize("mode", ["both", "cond"])
def test_cfg_gradient_flows_through_the_passes_the_setting_names(saved, inputs, mode):
    """train.cfg_gradient: the gradient of the guided velocity through both passes (exact), or
    through the conditional pass alone (the unconditional pass is a constant)."""
    _, model = saved
    noise, cond = inputs
    sigma = torch.tensor([0.3, 0.8])
    pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
    neg = {k[len("negative_"):]: v for k, v in cond.items() if k.startswith("negative_")}
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    w = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3))

    def grads(fn):
        model.transformer.zero_grad(set_to_none=True)
        (fn() * w).sum().backward()
        return [p.grad.clone() for p in params]

    model.set_precision("none", mode)
    try:
        got = grads(lambda: model.velocity(noise, sigma, cond, 4.0))
    finally:
        model.set_precision("none", "both")
    if mode == "both":
        want = grads(lambda: 4.0 * model.predict(noise, sigma, pos, None) - 3.0 * model.predict(noise, sigma, neg, None))
    else:
        with torch.no_grad():
            v_u = model.predict(noise, sigma, neg, None)
        want = grads(lambda: 4.0 * model.predict(noise, sigma, pos, None) - 3.0 * v_u)
    other = grads(lambda: 4.0 * model.predict(noise, sigma, pos, None))  # what neither mode is
    scale = max(g.abs().max().item() for g in want)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < 1e-5 * scale
    if mode == "both":
        assert max((a - b).abs().max().item() for a, b in zip(got, other)) > 1e-2 * scale
    model.transformer.zero_grad(set_to_none=True)


def test_quantize_timesteps_floors_the_timestep(saved, inputs):
    _, model = saved
    noise, cond = inputs
    pos = {k: v for k, v in cond.items() if not k.startswith("negative_")}
    sigma = torch.tensor([0.30049, 0.8])
    assert not model.quantize_timesteps  # the pipeline's unquantised timestep by default
    with torch.no_grad():
        exact = model.predict(noise, sigma, pos, None)
        ref = model.transformer(hidden_states=noise, timestep=torch.tensor([300.0, 800.0]),
                                encoder_hidden_states=pos["prompt_embeds"],
                                pooled_projections=pos["pooled_prompt_embeds"], return_dict=False)[0]
        model.quantize_timesteps = True
        try:
            assert torch.equal(model.predict(noise, sigma, pos, None), ref)
        finally:
            model.quantize_timesteps = False
        assert not torch.equal(exact, ref)


def test_rollout_and_decode_equal_the_pipeline(saved, inputs, base_images):
    _, model = saved
    noise, cond = inputs
    with torch.no_grad():
        images = model.decode(rollout(model, cond, noise, STEPS, CFG))
    assert images.shape == base_images.shape == (2, 3, H, W) and base_images.dtype == torch.float32
    assert (images - base_images).abs().max() < 1e-4
    assert (images[0] - images[1]).abs().max() > 0.05  # two prompts (and noises), two images
    without_cfg = model.pipeline_images(cond, noise, STEPS, 1.0)
    assert (without_cfg - base_images).abs().max() > 1e-3


def test_decode_is_differentiable_and_encode_inverts_the_normalisation(saved, inputs):
    _, model = saved
    noise, _ = inputs
    latents = noise.clone().requires_grad_(True)
    pixels = model.decode(latents)
    pixels.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert pixels.min() >= 0 and pixels.max() <= 1
    z = model.encode(pixels.detach())
    assert z.shape == noise.shape and not z.requires_grad
    cfg = model.vae.config
    raw = model.vae.encode(pixels.detach() * 2 - 1).latent_dist.mode()
    assert torch.allclose(z, (raw - cfg.shift_factor) * cfg.scaling_factor)


def test_latent_shape_and_size_errors(saved):
    _, model = saved
    assert model.latent_shape(2, H, W) == (2, 4, 16, 24)
    with pytest.raises(UserError, match="multiples of 4"):
        model.latent_shape(1, 30, 48)
    with pytest.raises(UserError, match="too large"):
        model.latent_shape(1, 4 * 33, 32)


def test_incompatible_transformer_is_a_one_line_error(saved):
    _, m = saved
    bad = SD3Transformer2DModel(sample_size=32, in_channels=8, out_channels=8, num_layers=1, attention_head_dim=8,
                                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                pooled_projection_dim=64, pos_embed_max_size=32)
    with pytest.raises(UserError, match="in_channels = 8 but vae latent_channels = 4") as e:
        SD3Model(bad, m.vae, m.text_encoder, m.tokenizer, m.text_encoder_2, m.tokenizer_2,
                 m.text_encoder_3, m.tokenizer_3, m.scheduler)
    assert "\n" not in str(e.value)


def test_saved_folder_loads_with_the_same_images(saved, inputs, base_images):
    path, model = saved
    noise, cond = inputs
    loaded = SD3Model.load(path, max_sequence_length=model.max_sequence_length)
    assert type(loaded) is SD3Model and type(loaded.tokenizer_3).__name__ == "CLIPTokenizer"
    assert all(torch.equal(cond[k], v) for k, v in loaded.encode_prompts(PROMPTS).items())
    assert torch.equal(loaded.pipeline_images(cond, noise, STEPS, CFG), base_images)
    assert not any(path.rglob("*.bin")) and any(path.rglob("*.safetensors"))
    other = build_tiny_sd3(seed=1)  # another seed is another model: the comparison can fail
    assert (other.pipeline_images(cond, noise, STEPS, CFG) - base_images).abs().max() > 1e-3


def test_folder_without_t5_loads(tmp_path, saved):
    _, m = saved
    model = SD3Model(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.text_encoder_2, m.tokenizer_2,
                     None, None, m.scheduler, max_sequence_length=8)
    model.pipeline().save_pretrained(str(tmp_path), safe_serialization=True)
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    loaded = SD3Model.load(tmp_path, max_sequence_length=8)
    assert loaded.text_encoder_3 is None and len(loaded.text_encoders()) == 2


def _fake_folder(root, saved_path, drop=(), class_name=None):
    root.mkdir()
    index = json.loads((saved_path / "model_index.json").read_text())
    if class_name:
        index["_class_name"] = class_name
    (root / "model_index.json").write_text(json.dumps(index))
    for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
              "tokenizer_2", "tokenizer_3", "scheduler"):
        if c not in drop:
            (root / c).mkdir()
    return root


def test_load_errors_are_one_line_and_name_the_problem(saved, tmp_path):
    path, _ = saved
    cases = [
        (lambda: SD3Model.load(tmp_path / "nowhere"), "does not exist"),
        (lambda: SD3Model.load(None), "needs a path"),
        (lambda: SD3Model.load(path, resolution=512), "unknown option(s) for model 'sd3': resolution"),
        (lambda: SD3Model.load(_fake_folder(tmp_path / "empty", path, drop=("vae",))), "lacks vae/"),
        (lambda: SD3Model.load(_fake_folder(tmp_path / "flux", path, class_name="FluxPipeline")),
         "holds a FluxPipeline pipeline, not StableDiffusion3"),
        (lambda: SD3Model.load(_fake_folder(tmp_path / "t5", path, drop=("text_encoder_3",))),
         "lacks text_encoder_3/"),
        (lambda: SD3Model.load(_fake_folder(tmp_path / "noweights", path)), "cannot load weights from"),
        (lambda: TinySD3Model.load(path), "takes no path"),
        (lambda: TinySD3Model.load(depth=3), "bad option for model 'tiny_sd3'"),
    ]
    (tmp_path / "model_index").mkdir()
    cases.append((lambda: SD3Model.load(tmp_path / "model_index"), "no model_index.json"))
    wrong = tmp_path / "wrong_transformer"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    cases.append((lambda: SD3Model.load(path, transformer_path=wrong),
                  "holds a FluxTransformer2DModel, not a SD3Transformer2DModel"))
    for call, message in cases:
        with pytest.raises(UserError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_save_transformer_round_trip(saved, inputs, tmp_path):
    path, model = saved
    noise, cond = inputs
    model.save_transformer(tmp_path / "t")
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "t", local_files_only=True)
    mine, theirs = model.transformer.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # both families' loaders take it as transformer_path
    sigma = torch.tensor([0.5, 0.5])
    pos = {k: cond[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    with torch.no_grad():
        v = model.predict(noise, sigma, pos, None)
        for other in (SD3Model.load(path, transformer_path=tmp_path / "t", max_sequence_length=64),
                      TinySD3Model.load(seed=5, transformer_path=tmp_path / "t")):
            assert torch.equal(other.predict(noise, sigma, pos, None), v)


def test_lora_saved_by_the_model_loads_in_the_pipeline(saved, inputs, base_images, tmp_path):
    path, model = saved
    noise, cond = inputs
    adapted = SD3Model.load(path, max_sequence_length=model.max_sequence_length)
    targets = sorted(SD3Model.lora_targets)
    adapted.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                                    init_lora_weights="gaussian"))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, p in adapted.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    layers = peft.get_peft_model_state_dict(adapted.transformer)
    assert layers and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in layers)
    assert any(".attn.add_q_proj." in k for k in layers) and any(".attn.to_add_out." in k for k in layers)
    adapted.save_lora(tmp_path / "lora", layers, {"r": 4, "lora_alpha": 4, "target_modules": targets,
                                                  "lora_dropout": 0.0})
    images = adapted.pipeline_images(cond, noise, STEPS, CFG)
    assert (images - base_images).abs().max() > 1e-3

    pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    ref = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               negative_prompt_embeds=cond["negative_prompt_embeds"],
               negative_pooled_prompt_embeds=cond["negative_pooled_prompt_embeds"], latents=noise, height=H,
               width=W, num_inference_steps=STEPS, guidance_scale=CFG, output_type="pt").images
    assert (images - ref).abs().max() < 1e-4


def test_plan_parts_sizes(saved):
    path, model = saved
    big = SD3Model.plan_parts(None, {}, 1024, 1024)
    assert big.name == "SD3.5 Large" and big.image_tokens == 64 * 64 and big.text_tokens == 77 + 256
    assert next(big.transformer.parameters()).device.type == "meta"
    assert abs(sum(p.numel() for p in big.transformer.parameters()) - 8.06e9) < 0.01e9
    assert big.text_encoders == 123_650_304 + 694_659_840 + 4_762_310_656
    assert big.vae_config == {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
                              "latent_channels": 16}
    assert SD3Model.plan_parts(None, {"max_sequence_length": 512}, 768, 1344).image_tokens == 48 * 84
    small = SD3Model.plan_parts(path, {"max_sequence_length": 64}, H, W)
    assert small.image_tokens == 8 * 12 and small.text_tokens == 77 + 64
    n = sum(p.numel() for p in model.transformer.parameters())
    assert sum(p.numel() for p in small.transformer.parameters()) == n
    tiny = TinySD3Model.plan_parts(None, {}, H, W)
    assert sum(p.numel() for p in tiny.transformer.parameters()) == n and tiny.image_tokens == 96
    assert tiny.text_encoders == sum(p.numel() for e in model.text_encoders() for p in e.parameters())
    with pytest.raises(UserError, match="unknown option"):
        SD3Model.plan_parts(None, {"foo": 1}, 1024, 1024)


def test_tiny_is_deterministic_in_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_sd3(seed=0), build_tiny_sd3(seed=0), build_tiny_sd3(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.transformer.state_dict()["proj_out.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    t = TinySD3Model.load(dtype="bfloat16")
    assert type(t) is TinySD3Model and t.dtype == torch.bfloat16 and t.vae.dtype == torch.bfloat16
