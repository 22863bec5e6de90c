"""The FLUX.2 families: parity with Flux2Pipeline (FLUX.2 [dev], embedded guidance) and
Flux2KleinPipeline (FLUX.2 [klein], true CFG or distilled) - prompt encoding, schedule, guidance,
latent normalisation, the whole sampler - folder round trips and errors, transformer and LoRA
export, plan sizes."""

import json

import numpy as np
import peft
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu, retrieve_timesteps

from srpo.errors import UserError
from srpo.models import MODELS, family_of_folder
from srpo.models import flux2 as F
from srpo.models import flux2_tiny as FT
from srpo.models.flux2 import Flux2KleinModel, Flux2Model
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


@pytest.fixture(scope="module")
def base_images(saved, inputs):
    noise, cond = inputs
    return {v: m.pipeline_images(cond[v], noise, STEPS, G) for v, (_, m) in saved.items()}


def pos_neg(cond):
    return ({k: v for k, v in cond.items() if not k.startswith("negative_")},
            {k[len("negative_"):]: v for k, v in cond.items() if k.startswith("negative_")})


def test_registered_classes_and_family_facts(saved):
    assert MODELS.get("flux2") is Flux2Model and MODELS.get("tiny_flux2") is TinyFlux2Model
    assert MODELS.get("flux2_klein") is Flux2KleinModel and MODELS.get("tiny_flux2_klein") is TinyFlux2KleinModel
    assert Flux2Model.pipeline_class == "Flux2Pipeline" and Flux2KleinModel.pipeline_class == "Flux2KleinPipeline"
    assert Flux2Model.transformer_class == Flux2KleinModel.transformer_class == "Flux2Transformer2DModel"
    assert Flux2Model.guidance_mode == "embedded" and Flux2KleinModel.guidance_mode == "cfg"
    assert not Flux2KleinModel.cfg_batched and Flux2Model.default_guidance == Flux2KleinModel.default_guidance == 4.0
    dev, klein = saved["dev"][1], saved["klein"][1]
    assert dev.guidance_mode == "embedded" and dev.transformer.config.guidance_embeds
    assert klein.guidance_mode == "cfg" and not klein.transformer.config.guidance_embeds
    distilled = build_tiny_flux2_klein(seed=0, is_distilled=True)
    assert distilled.guidance_mode == "none" and distilled.default_guidance == 1.0
    assert family_of_folder(saved["dev"][0]) == "flux2" and family_of_folder(saved["klein"][0]) == "flux2_klein"


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


def test_schedule_equals_pipeline_sigmas(saved, inputs):
    noise, cond = inputs
    model = saved["dev"][1]
    for n in (100, 1024, 4096, 4300, 4301, 16384):  # the empirical mu, both branches
        for steps in (4, 28, 50):
            assert F.empirical_mu(n, steps) == compute_empirical_mu(n, steps)
    seen = {}
    pipe = model.pipeline()
    pipe(prompt_embeds=cond["dev"]["prompt_embeds"], latents=noise, height=H, width=W, num_inference_steps=STEPS,
         guidance_scale=G, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.update(s=p.scheduler.sigmas) or {})
    assert torch.equal(model.schedule(STEPS, H, W), seen["s"].double())
    # as __call__ sets them; 256x512 is 8192 tokens, beyond the 4300 where the fit changes
    for steps, (h, w) in ((28, (H, W)), (50, (128, 128)), (8, (256, 512))):
        pipe = model.pipeline()
        n = (h // 4) * (w // 4)
        retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                           mu=compute_empirical_mu(n, steps))
        assert torch.equal(model.schedule(steps, h, w), pipe.scheduler.sigmas.double())
    assert not torch.equal(model.schedule(8, H, W), model.schedule(8, 128, 128))  # resolution-dependent
    shifted = build_tiny_flux2(seed=0, shift=1.5)  # a shift override reaches the pipeline too
    pipe = shifted.pipeline()
    retrieve_timesteps(pipe.scheduler, 4, "cpu", sigmas=np.linspace(1.0, 0.25, 4), mu=1.0)
    assert torch.equal(shifted.schedule(4, H, W), pipe.scheduler.sigmas.double())
    assert not torch.equal(shifted.schedule(4, H, W), model.schedule(4, H, W))


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


def test_klein_cfg_two_passes_by_hand_and_one_pass_at_scale_one(saved, inputs):
    noise, cond = inputs
    model = saved["klein"][1]
    pos, neg = pos_neg(cond["klein"])
    sigma = torch.tensor([0.3, 0.8])
    calls = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["guidance"]), with_kwargs=True)
    try:
        with torch.no_grad():
            v_c, v_u = model.predict(noise, sigma, pos, None), model.predict(noise, sigma, neg, None)
            calls.clear()
            v1 = model.velocity(noise, sigma, cond["klein"], 1.0)
            assert len(calls) == 1 and torch.equal(v1, v_c)
            v4 = model.velocity(noise, sigma, cond["klein"], 4.0)
            assert len(calls) == 3 and calls == [None] * 3  # two separate passes, as the pipeline runs them
    finally:
        hook.remove()
    assert torch.equal(v4, v_u + 4.0 * (v_c - v_u))
    assert (v_c - v_u).abs().max() > 1e-3
    distilled = build_tiny_flux2_klein(seed=0, is_distilled=True)
    c = distilled.encode_prompts(PROMPTS)
    with torch.no_grad():
        assert torch.equal(distilled.velocity(noise, sigma, c, 4.0), distilled.velocity(noise, sigma, c, 1.0))


@pytest.mark.parametrize("variant", ["dev", "klein"])
def test_rollout_and_decode_equal_the_pipeline(saved, inputs, base_images, variant):
    model = saved[variant][1]
    noise, cond = inputs
    with torch.no_grad():
        images = model.decode(rollout(model, cond[variant], noise, STEPS, G))
    ref = base_images[variant]
    assert images.shape == ref.shape == (2, 3, H, W) and ref.dtype == torch.float32
    assert (images - ref).abs().max() < 1e-4
    assert (images[0] - images[1]).abs().max() > 0.05  # two prompts (and noises), two images
    other = model.pipeline_images(cond[variant], noise, STEPS, 1.0)  # the guidance scale matters
    assert (other - ref).abs().max() > 1e-3


def test_distilled_klein_equals_its_pipeline(inputs):
    noise, _ = inputs
    model = build_tiny_flux2_klein(seed=2, is_distilled=True)
    cond = model.encode_prompts(PROMPTS)
    with torch.no_grad():
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
    assert pixels.min() >= 0 and pixels.max() <= 1
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


def test_latent_shape_and_size_errors(saved):
    model = saved["dev"][1]
    assert model.latent_shape(2, H, W) == (2, 16, 8, 12)
    assert model.pixel_size(torch.zeros(1, 16, 8, 12)) == (H, W)
    with pytest.raises(UserError, match="multiples of 4"):
        model.latent_shape(1, 30, 48)


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


def test_saved_folders_load_with_the_same_images(saved, inputs, base_images):
    noise, cond = inputs
    for v, (path, model) in saved.items():
        loaded = MODEL[v].load(path, max_sequence_length=model.max_sequence_length)
        assert type(loaded) is MODEL[v] and loaded.text_encoder_out_layers == model.text_encoder_out_layers
        assert all(torch.equal(cond[v][k], t) for k, t in loaded.encode_prompts(PROMPTS).items())
        assert torch.equal(loaded.pipeline_images(cond[v], noise, STEPS, G), base_images[v])
        assert not any(path.rglob("*.bin")) and any(path.rglob("*.safetensors"))
    assert type(Flux2Model.load(saved["dev"][0]).tokenizer).__name__ == "PixtralProcessor"
    assert json.loads((saved["klein"][0] / "model_index.json").read_text())["is_distilled"] is False
    other = build_tiny_flux2(seed=1)  # another seed is another model: the comparison can fail
    assert (other.pipeline_images(cond["dev"], noise, STEPS, G) - base_images["dev"]).abs().max() > 1e-3


def _fake_folder(root, saved_path, drop=(), class_name=None):
    root.mkdir()
    index = json.loads((saved_path / "model_index.json").read_text())
    if class_name:
        index["_class_name"] = class_name
    (root / "model_index.json").write_text(json.dumps(index))
    for c in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if c not in drop:
            (root / c).mkdir()
    return root


def test_load_errors_are_one_line_and_name_the_problem(saved, tmp_path):
    dev, klein = saved["dev"][0], saved["klein"][0]
    cases = [
        (lambda: Flux2Model.load(tmp_path / "nowhere"), "does not exist"),
        (lambda: Flux2Model.load(None), "needs a path"),
        (lambda: Flux2Model.load(dev, resolution=512), "unknown option(s) for model 'flux2': resolution"),
        (lambda: Flux2Model.load(dev, negative_prompt="x"), "unknown option(s) for model 'flux2': negative_prompt"),
        (lambda: Flux2Model.load(_fake_folder(tmp_path / "novae", dev, drop=("vae",))), "lacks vae/"),
        (lambda: Flux2Model.load(_fake_folder(tmp_path / "flux1", dev, class_name="FluxPipeline")),
         "holds a FluxPipeline pipeline, not Flux2"),
        (lambda: Flux2Model.load(klein),
         "holds a Flux2KleinPipeline pipeline, not Flux2Pipeline: use model 'flux2_klein'"),
        (lambda: Flux2KleinModel.load(dev),
         "holds a Flux2Pipeline pipeline, not Flux2KleinPipeline: use model 'flux2'"),
        (lambda: Flux2Model.load(_fake_folder(tmp_path / "noweights", dev)), "cannot load weights from"),
        (lambda: Flux2Model.load(dev, text_encoder_out_layers=[10, 20, 33]), "do not fit this text encoder"),
        (lambda: TinyFlux2Model.load(dev), "takes no path"),
        (lambda: TinyFlux2Model.load(depth=3), "bad option for model 'tiny_flux2'"),
        (lambda: TinyFlux2Model.load(is_distilled=True), "bad option for model 'tiny_flux2'"),
        (lambda: TinyFlux2KleinModel.load(axes_dims_rope=(4, 4, 4)), "axes_dims_rope"),
    ]
    (tmp_path / "model_index").mkdir()
    cases.append((lambda: Flux2Model.load(tmp_path / "model_index"), "no model_index.json"))
    wrong = tmp_path / "wrong_transformer"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    cases.append((lambda: Flux2KleinModel.load(klein, transformer_path=wrong),
                  "holds a FluxTransformer2DModel, not a Flux2Transformer2DModel"))
    for call, message in cases:
        with pytest.raises(UserError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_save_transformer_round_trip(saved, inputs, tmp_path):
    path, model = saved["klein"]
    noise, cond = inputs
    model.save_transformer(tmp_path / "t")
    reloaded = Flux2Transformer2DModel.from_pretrained(tmp_path / "t", local_files_only=True)
    mine, theirs = model.transformer.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    sigma = torch.tensor([0.5, 0.5])
    pos = {"prompt_embeds": cond["klein"]["prompt_embeds"]}
    with torch.no_grad():
        v = model.predict(noise, sigma, pos, None)
        for other in (Flux2KleinModel.load(path, transformer_path=tmp_path / "t", max_sequence_length=128),
                      TinyFlux2KleinModel.load(seed=5, transformer_path=tmp_path / "t")):
            assert torch.equal(other.predict(noise, sigma, pos, None), v)


def test_lora_saved_by_the_model_loads_in_the_pipeline(saved, inputs, base_images, tmp_path):
    path, model = saved["dev"]
    noise, cond = inputs
    adapted = Flux2Model.load(path, max_sequence_length=model.max_sequence_length)
    targets = sorted(adapted.lora_targets)
    assert "single_transformer_blocks.0.attn.to_out" in targets and len(targets) == 14  # one single block
    assert len(Flux2Model.lora_targets) == 13 + 48  # FLUX.2 [dev]'s 48 single blocks
    adapted.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets,
                                                    init_lora_weights="gaussian"))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, p in adapted.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    layers = peft.get_peft_model_state_dict(adapted.transformer)
    adapted_layers = {k.rsplit(".lora_", 1)[0] for k in layers}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
            "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out",
            "transformer_blocks.0.attn.to_add_out", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            "single_transformer_blocks.0.attn.to_out"} <= adapted_layers
    assert len(adapted_layers) == 14
    adapted.save_lora(tmp_path / "lora", layers,
                      {"r": 4, "lora_alpha": 4, "target_modules": targets, "lora_dropout": 0.0})
    images = adapted.pipeline_images(cond["dev"], noise, STEPS, G)
    assert (images - base_images["dev"]).abs().max() > 1e-3

    pipe = Flux2Pipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    ref = pipe(prompt_embeds=cond["dev"]["prompt_embeds"], latents=noise, height=H, width=W, num_inference_steps=STEPS,
               guidance_scale=G, output_type="pt", max_sequence_length=128).images
    assert (images - ref).abs().max() < 1e-4


def test_plan_parts_sizes(saved):
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
    assert klein.text_encoders == F.QWEN3_4B_PARAMS == F.count_text_encoder_params()["qwen3_4b"]
    for v, (path, model) in saved.items():
        small = MODEL[v].plan_parts(path, {"max_sequence_length": 128}, H, W)
        n = sum(p.numel() for p in model.transformer.parameters())
        assert small.image_tokens == 8 * 12 and small.text_tokens == 128
        assert sum(p.numel() for p in small.transformer.parameters()) == n
        assert small.text_encoders == sum(p.numel() for p in model.text_encoder.parameters())
        tiny = (TinyFlux2KleinModel if v == "klein" else TinyFlux2Model).plan_parts(None, {}, H, W)
        assert sum(p.numel() for p in tiny.transformer.parameters()) == n and tiny.image_tokens == 96
        assert tiny.text_encoders == small.text_encoders
    assert dev.guidance_mode is None and klein.guidance_mode is None  # the classes' modes
    assert TinyFlux2KleinModel.plan_parts(None, {"is_distilled": True}, H, W).guidance_mode == "none"
    with pytest.raises(UserError, match="unknown option"):
        Flux2Model.plan_parts(None, {"foo": 1}, 1024, 1024)


def test_tiny_is_deterministic_in_seed_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_flux2(seed=0), build_tiny_flux2(seed=0), build_tiny_flux2(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.transformer.state_dict()["proj_out.weight"] for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert FT.train_bpe(FT.QWEN_SPECIAL).get_vocab() == FT.train_bpe(FT.QWEN_SPECIAL).get_vocab()
    assert a.tokenizer.tokenizer.convert_tokens_to_ids(["<s>", "[INST]", "[IMG]", "<pad>", "[SYSTEM_PROMPT]"]) == \
        [1, 3, 10, 11, 17]
    t = TinyFlux2KleinModel.load(dtype="bfloat16")
    assert type(t) is TinyFlux2KleinModel and t.dtype == torch.bfloat16 and t.vae.dtype == torch.bfloat16
