"""What is particular to the Qwen-Image family (the checks every family passes are in
test_family_contract.py): QwenImagePipeline's prompt template, masks and ragged text lengths, its
schedule (dynamic mu, shift_terminal), the transformer inputs, the norm-rescaled true CFG, the
per-channel latent normalisation, fit errors, the flagship's plan sizes, the tiny tokenizer."""

import json

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from family_runs import check_one_line_errors, inputs_fixture, twin_fixture
from srpo.errors import UserError
from srpo.models.base import split_cond
from srpo.models.qwen_image import (PROMPT_TEMPLATE, PROMPT_TEMPLATE_START_IDX, TEXT_ENCODER_PARAMS, QwenImageModel,
                                    trim_text)
from srpo.models.qwen_image_tiny import build_tiny_qwen_image, save_tiny_qwen_image, tiny_tokenizer

PROMPTS = ["a red cube on a table", "a small blue ball in the grass near a lake at dusk"]
H, W = 32, 48


saved = twin_fixture(save_tiny_qwen_image)

inputs = inputs_fixture(PROMPTS, H, W)


def test_the_prompt_template_and_vae_factor_are_the_pipelines(saved):
    _, model = saved
    pipe = model.pipeline()
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == PROMPT_TEMPLATE_START_IDX == 34
    assert model.vae_scale_factor == pipe.vae_scale_factor == 4


def test_tiny_tokenizer_is_deterministic_and_drops_exactly_the_template_prefix():
    tok = tiny_tokenizer()
    again = tiny_tokenizer.__wrapped__()  # a fresh build, not the cached one
    assert tok.get_vocab() == again.get_vocab() and type(tok).__name__ == "Qwen2Tokenizer"
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    ids = tok(PROMPT_TEMPLATE.format("a red cube")).input_ids
    assert ids[:34] == tok(prefix).input_ids  # what the pipeline drops is the system prompt and "user\n"
    assert tok.decode(ids[34:]) == "a red cube<|im_end|>\n<|im_start|>assistant\n"
    assert tok.pad_token == "<|endoftext|>" and tok.convert_tokens_to_ids("<|im_start|>") == len(tok) - 7


def test_encode_prompts_equal_pipeline_encode_prompt(saved, inputs):
    _, model = saved
    _, cond = inputs
    pipe = model.pipeline()
    L = model.max_sequence_length
    assert set(cond) == {"prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds",
                         "negative_prompt_embeds_mask"}
    assert cond["prompt_embeds"].shape == (2, L, 32) and cond["prompt_embeds_mask"].shape == (2, L)
    ref, ref_mask = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=L)
    embeds, mask = trim_text(cond["prompt_embeds"], cond["prompt_embeds_mask"])
    assert torch.equal(embeds, ref) and torch.equal(mask, ref_mask)  # ragged: the pipeline keeps its mask
    assert mask[0].sum() < mask[1].sum() == mask.shape[1]
    assert not cond["prompt_embeds"][:, ref.shape[1]:].any() and not cond["prompt_embeds_mask"][:, ref.shape[1]:].any()
    # the negative prompt as the pipeline encodes a string: once, no mask (every token valid)
    neg, neg_mask = pipe.encode_prompt(" ", device=torch.device("cpu"), max_sequence_length=L)
    n_embeds, n_mask = trim_text(cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
    assert neg_mask is None and n_mask.all() and torch.equal(n_embeds, neg.expand(2, -1, -1))
    # a truncating max_sequence_length, and another negative prompt
    short = build_tiny_qwen_image(seed=0, max_sequence_length=5, negative_prompt="blurry, low quality")
    mine = short.encode_prompts(PROMPTS)
    ref, ref_mask = short.pipeline().encode_prompt(PROMPTS, device=torch.device("cpu"), max_sequence_length=5)
    assert ref_mask is None and torch.equal(mine["prompt_embeds"], ref) and mine["prompt_embeds_mask"].all()
    neg, _ = short.pipeline().encode_prompt("blurry, low quality", device=torch.device("cpu"), max_sequence_length=5)
    assert torch.equal(mine["negative_prompt_embeds"][1:], neg)


def _pipeline_sigmas(model, steps, height, width):
    """The sigmas QwenImagePipeline.__call__ sets (one step run, then interrupted)."""
    pipe = model.pipeline()
    cond = model.encode_prompts(["a cube"])
    shape = model.latent_shape(1, height, width)

    def stop(p, i, t, kwargs):
        p._interrupt = True
        return kwargs

    pipe(prompt_embeds=cond["prompt_embeds"][:, :4], prompt_embeds_mask=cond["prompt_embeds_mask"][:, :4],
         true_cfg_scale=1.0, height=height, width=width, num_inference_steps=steps,
         latents=torch.zeros(1, shape[2] * shape[3] // 4, 4 * shape[1]), output_type="latent",
         callback_on_step_end=stop)
    return pipe.scheduler.sigmas.double()


def test_schedule_equals_the_sigmas_the_pipeline_sets(saved):
    _, model = saved
    for steps, h, w in ((4, H, W), (50, H, W), (28, 1024, 768)):
        assert torch.equal(model.schedule(steps, h, w), _pipeline_sigmas(model, steps, h, w)), (steps, h, w)
    grid = model.schedule(50, 1024, 1024)  # dynamic: another size is another schedule; shift_terminal 0.02
    assert not torch.equal(grid, model.schedule(50, 512, 512))
    assert grid[0] == 1 and abs(grid[-2].item() - 0.02) < 1e-6 and grid[-1] == 0
    shifted = build_tiny_qwen_image(seed=0, shift=3.0)  # a fixed shift: the same grid at every size
    assert torch.equal(shifted.schedule(4, H, W), shifted.schedule(4, 1024, 1024))


def test_predict_feeds_the_transformer_as_the_pipeline_does(saved, inputs):
    _, model = saved
    noise, cond = inputs
    pos, neg = split_cond(cond)
    sigma = torch.tensor([0.30049, 0.8])
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            v = model.predict(noise, sigma, pos, None)
            model.predict(noise, sigma, neg, None)
    finally:
        hook.remove()
    kw, kw_neg = seen
    lengths = cond["prompt_embeds_mask"].sum(1)
    assert kw["encoder_hidden_states"].shape == (2, int(lengths.max()), 32)
    assert torch.equal(kw["encoder_hidden_states_mask"], cond["prompt_embeds_mask"][:, : int(lengths.max())])
    assert kw_neg["encoder_hidden_states_mask"] is None  # all valid: no mask, as encode_prompt drops it
    assert kw["img_shapes"] == [[(1, 4, 6)]] * 2 and kw["hidden_states"].shape == (2, 24, 16)
    assert torch.equal(kw["timestep"], (sigma * 1000) / 1000)
    assert v.shape == noise.shape
    with torch.no_grad():
        model.quantize_timesteps = True
        try:
            q = model.predict(noise, sigma, pos, None)
            ref = model.transformer(hidden_states=kw["hidden_states"], timestep=torch.tensor([0.3, 0.8]),
                                    encoder_hidden_states=kw["encoder_hidden_states"],
                                    encoder_hidden_states_mask=kw["encoder_hidden_states_mask"],
                                    img_shapes=kw["img_shapes"], return_dict=False)[0]
            assert torch.equal(q, QwenImagePipeline._unpack_latents(ref, H, W, 4)[:, :, 0])
        finally:
            model.quantize_timesteps = False
    assert not torch.equal(q, v)


def test_cfg_is_the_pipelines_norm_rescaled_combination(saved, inputs):
    _, model = saved
    noise, cond = inputs
    pos, neg = split_cond(cond)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_c, v_u = model.predict(noise, sigma, pos, None), model.predict(noise, sigma, neg, None)
        v4 = model.velocity(noise, sigma, cond, 4.0)
    pack = lambda x: QwenImagePipeline._pack_latents(x, 2, 4, x.shape[2], x.shape[3])  # noqa: E731
    comb = pack(v_u) + 4.0 * (pack(v_c) - pack(v_u))
    want = comb * (torch.norm(pack(v_c), dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.equal(pack(v4), want)
    assert (v4 - (v_u + 4.0 * (v_c - v_u))).abs().max() > 1e-3  # the rescale is not the plain combination


def test_encode_inverts_the_per_channel_normalisation(saved, inputs):
    _, model = saved
    noise, _ = inputs
    with torch.no_grad():
        pixels = model.decode(noise)
    z = model.encode(pixels)
    assert z.shape == noise.shape and not z.requires_grad
    cfg = model.vae.config
    raw = model.vae.encode(pixels[:, :, None] * 2 - 1).latent_dist.mode()[:, :, 0]
    mean, std = torch.tensor(cfg.latents_mean)[:, None, None], torch.tensor(cfg.latents_std)[:, None, None]
    assert len(set(cfg.latents_std)) > 1 and torch.allclose(z, (raw - mean) / std, atol=1e-6)


def test_incompatible_transformer_is_a_one_line_error(saved):
    _, m = saved
    bad = QwenImageTransformer2DModel(in_channels=32, out_channels=8, num_layers=1, attention_head_dim=16,
                                      num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 4, 4))
    with pytest.raises(UserError, match="in_channels = 32 but 4 x vae z_dim = 16") as e:
        QwenImageModel(bad, m.vae, m.text_encoder, m.tokenizer, m.scheduler)
    assert "\n" not in str(e.value)
    wide = QwenImageTransformer2DModel(in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 4, 4))
    with pytest.raises(UserError, match="joint_attention_dim = 64 but text_encoder hidden_size = 32"):
        QwenImageModel(wide, m.vae, m.text_encoder, m.tokenizer, m.scheduler)
    with pytest.raises(UserError, match="max_sequence_length 2000 is out of range"):
        QwenImageModel(m.transformer, m.vae, m.text_encoder, m.tokenizer, m.scheduler, max_sequence_length=2000)


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


def test_load_errors_particular_to_qwen_image(saved, tmp_path):
    path, _ = saved
    cases = [
        (lambda: QwenImageModel.load(_fake_folder(tmp_path / "edit", path, class_name="QwenImageEditPipeline")),
         "holds a QwenImageEditPipeline pipeline, not QwenImagePipeline"),
        (lambda: QwenImageModel.load(path, max_sequence_length=0), "max_sequence_length 0 is out of range"),
    ]
    check_one_line_errors(cases)


def test_plan_parts_sizes(saved, tmp_path):
    path, _ = saved
    big = QwenImageModel.plan_parts(None, {}, 1024, 1024)
    assert big.name == "Qwen-Image" and big.image_tokens == 64 * 64 and big.text_tokens == 512
    assert next(big.transformer.parameters()).device.type == "meta"
    assert abs(sum(p.numel() for p in big.transformer.parameters()) - 20.43e9) < 0.01e9
    assert len(big.transformer.transformer_blocks) == 60
    assert big.text_encoders == TEXT_ENCODER_PARAMS  # the count from its real config, below
    assert big.vae_config == {"block_out_channels": (96, 192, 384, 384), "layers_per_block": 2,
                              "latent_channels": 16}
    assert abs(sum(p.numel() for p in big.vae.parameters()) - 126.9e6) < 0.1e6
    assert QwenImageModel.plan_parts(None, {"max_sequence_length": 1024}, 928, 1664).image_tokens == 58 * 104
    small = QwenImageModel.plan_parts(path, {"max_sequence_length": 64}, H, W)
    assert small.image_tokens == 4 * 6 and small.text_tokens == 64
    # Qwen-Image's own text_encoder/config.json (Qwen2.5-VL-7B-Instruct, the legacy flat layout)
    folder = _fake_folder(tmp_path / "real", path)
    for c in ("transformer", "vae"):
        (folder / c / "config.json").write_text((path / c / "config.json").read_text())
    (folder / "text_encoder" / "config.json").write_text(json.dumps(QWEN25_VL_7B))
    assert QwenImageModel.plan_parts(folder, {}, H, W).text_encoders == TEXT_ENCODER_PARAMS


QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 128000, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "vocab_size": 152064, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "temporal_patch_size": 2},
}
