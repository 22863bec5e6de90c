"""What is particular to the SD3 / SD3.5 family (the checks every family passes are in
test_family_contract.py): StableDiffusion3Pipeline's prompt encoding, with and without T5, its
dynamic-shifting schedule, the latent normalisation, size and fit errors, folders without T5, the
flagship's plan sizes."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from family_runs import inputs_fixture, twin_fixture
from srpo.errors import UserError
from srpo.models.sd3 import SD3Model
from srpo.models.sd3_tiny import TinySD3Model, save_tiny_sd3

PROMPTS = ["a red cube on a table", "a small blue ball in the grass"]
H, W = 32, 48
NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


saved = twin_fixture(save_tiny_sd3)

inputs = inputs_fixture(PROMPTS, H, W)


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


def test_schedule_dynamic_shifting_uses_the_pipelines_image_seq_len(saved):
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
    assert (model.schedule(4, H, W) - m.schedule(4, H, W)).abs().max() > 1e-2  # not the fixed shift


def test_latent_size_is_capped_by_the_position_embedding(saved):
    _, model = saved
    assert model.latent_shape(2, H, W) == (2, 4, 16, 24)
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


def test_folder_without_t5_loads(tmp_path, saved):
    _, m = saved
    model = SD3Model(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.text_encoder_2, m.tokenizer_2,
                     None, None, m.scheduler, max_sequence_length=8)
    model.pipeline().save_pretrained(str(tmp_path), safe_serialization=True)
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    loaded = SD3Model.load(tmp_path, max_sequence_length=8)
    assert loaded.text_encoder_3 is None and len(loaded.text_encoders()) == 2
    assert not loaded.quantize_timesteps  # the pipeline's unquantised timestep by default
    # srpo plan counts the folder's two CLIPs alone
    clips = sum(p.numel() for e in loaded.text_encoders() for p in e.parameters())
    assert SD3Model.plan_parts(tmp_path, {}, H, W).text_encoders == clips


def test_a_listed_t5_must_be_there(saved, tmp_path):
    path, _ = saved
    root = tmp_path / "no_t5"
    root.mkdir()
    (root / "model_index.json").write_text((path / "model_index.json").read_text())  # it lists text_encoder_3
    for c in SD3Model.components:
        (root / c).mkdir()
    with pytest.raises(UserError, match="lacks text_encoder_3/, tokenizer_3/") as e:
        SD3Model.load(root)
    assert "\n" not in str(e.value)


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
    assert TinySD3Model.plan_parts(None, {}, H, W).text_tokens == 77 + model.max_sequence_length
