"""What is particular to the Wan family (the shared contract is tests/test_family_contract.py):
9-frame videos against WanPipeline encoding its own prompts (a negative prompt of its own, true
CFG), the video latents and their per-channel normalisation, rollout.frames, a reward on video
frames, two-expert options refused on one transformer, and the tiny config trained through the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from family_runs import check_full_run, check_one_line_errors, srpo
from srpo.config import load_config
from srpo.errors import UserError
from srpo.models import load_model
from srpo.models.wan import WanModel
from srpo.models.wan_tiny import TinyWanModel, save_tiny_wan
from srpo.rewards.factory import build_reward
from srpo.rewards.objective import RewardFn, frame_indices, reward_function
from srpo.sampling import rollout

PROMPTS = ["a red cube on a table", "a small blue ball in the grass near a lake at dusk"]
H, W, FRAMES, STEPS, CFG = 32, 48, 9, 4, 5.0
NEGATIVE = "blurry, static, worst quality"


@pytest.fixture(scope="module")
def wan():
    model = TinyWanModel.load(seed=0, negative_prompt=NEGATIVE)
    model.set_frames(FRAMES)
    noise = torch.randn(model.latent_shape(2, H, W), generator=torch.Generator().manual_seed(1))
    return model, noise, model.encode_prompts(PROMPTS)


def test_nine_frame_videos_equal_wan_pipeline_on_its_own_prompts(wan):
    """WanPipeline encodes the prompts and the negative prompt itself; true CFG at 5, 32 x 48,
    batch 2, 9 frames: srpo's rollout latents and decoded videos equal the pipeline's."""
    model, noise, cond = wan
    assert noise.shape == (2, 4, 3, H // 8, W // 8)  # [B, C, (9 - 1) / 4 + 1, h, w]
    with torch.no_grad():
        x0 = rollout(model, cond, noise, STEPS, CFG)
        ours = model.decode(x0)
    kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES,
                  num_inference_steps=STEPS, guidance_scale=CFG, max_sequence_length=model.max_sequence_length)
    pipe = model.pipeline()
    latents = pipe(latents=noise.clone(), output_type="latent", **kwargs).frames
    videos = pipe(latents=noise.clone(), output_type="pt", **kwargs).frames
    assert ours.shape == videos.shape == (2, FRAMES, 3, H, W)
    assert (x0 - latents).abs().max() < 1e-4 and (ours - videos).abs().max() < 1e-4
    assert (ours[:, 0] - ours[:, -1]).abs().max() > 1e-3  # the frames differ: a video, not a still
    embeds, negative = pipe.encode_prompt(PROMPTS, NEGATIVE, max_sequence_length=model.max_sequence_length,
                                          device="cpu")
    assert torch.equal(embeds, cond["prompt_embeds"]) and torch.equal(negative, cond["negative_prompt_embeds"])
    with torch.no_grad():  # the negative prompt acts
        plain = model.decode(rollout(model, model.encode_prompts(PROMPTS) | {
            "negative_prompt_embeds": TinyWanModel.load(seed=0).encode_prompts(PROMPTS)["negative_prompt_embeds"]},
            noise, STEPS, CFG))
    assert (plain - ours).abs().max() > 1e-3


def test_latents_use_the_vae_per_channel_statistics(wan):
    model, noise, _ = wan
    cfg = model.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    assert len(set(cfg.latents_std)) > 1  # not the identity
    with torch.no_grad():
        videos = model.decode(noise)
        raw = model.vae.decode(noise * std + mean).sample
    assert torch.allclose(videos, (raw * 0.5 + 0.5).clamp(0, 1).transpose(1, 2), atol=1e-4)  # (std vs 1 / std rounding, grown along the causal frames)
    z = model.encode(videos)
    mode = model.vae.encode((videos * 2 - 1).transpose(1, 2)).latent_dist.mode()
    assert z.shape == noise.shape and torch.allclose(z, (mode - mean) / std, atol=1e-5)


def test_frame_counts_the_vae_cannot_take_are_one_line_errors(wan):
    model = wan[0]
    check_one_line_errors([(lambda: model.set_frames(6), "rollout.frames 6 is not a frame count the Wan VAE "
                                                         "takes: use 5 or 9"),
                           (lambda: model.set_frames(80), "use 77 or 81"),
                           (lambda: model.set_frames(2), "use 1 or 5")])
    assert model.frames == FRAMES
    model.set_frames(81)
    assert model.latent_shape(1, 480, 832) == (1, 4, 21, 60, 104)
    model.set_frames(FRAMES)


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "srpo", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("config, frames, message", [
    ("tiny-wan", 6, "rollout.frames 6 is not a frame count the Wan VAE takes: use 5 or 9"),
    ("tiny", 5, "rollout.frames is 5 but model 'tiny_flux' makes images"),
])
def test_bad_frames_through_the_cli_are_one_line_exit_2(tmp_path, config, frames, message):
    res = cli("train", config, "--set", f"rollout.frames={frames}", "--output", tmp_path / "run")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("srpo: error:") and message in lines[0], res.stderr
    assert not (tmp_path / "run").exists()  # nothing written for bad input


def test_two_expert_options_on_one_transformer_and_mismatched_final_are_one_line(tmp_path):
    """Two experts are tests/test_wan_experts.py's; here the one-transformer side of their errors."""
    TinyWanModel.save_random(tmp_path / "wan21")
    (tmp_path / "both" / "transformer").mkdir(parents=True)
    (tmp_path / "both" / "transformer_2").mkdir()
    for name in ("transformer", "transformer_2"):
        (tmp_path / "both" / name / "config.json").write_text("{}")
    check_one_line_errors([
        (lambda: WanModel.load(tmp_path / "wan21", train_experts="both"), "options.train_experts is for two-expert"),
        (lambda: TinyWanModel.load(seed=0, guidance_scale_2=3.0), "options.guidance_scale_2 is for two-expert"),
        (lambda: WanModel.load(tmp_path / "wan21", transformer_path=tmp_path / "both"), "holds two experts but"),
    ])


# ---- rewards on videos -------------------------------------------------------------------------
def test_frame_indices_are_evenly_spaced_with_the_ends():
    assert frame_indices(4, 81) == [0, 27, 53, 80] and frame_indices(3, 5) == [0, 2, 4]
    assert frame_indices(1, 9) == [0] and frame_indices(12, 5) == [0, 1, 2, 3, 4]
    assert frame_indices([0, -1], 9) == [0, 8]
    check_one_line_errors([(lambda: frame_indices([9], 9), "names frame 9, but the videos have 9 frames")])


def test_an_image_reward_scores_the_frames_and_averages_per_video(wan):
    model, noise, _ = wan
    cfg = load_config("tiny-wan", ["reward.frames=3"])
    reward = build_reward(cfg.reward, training=True).frozen()
    fn = reward_function(cfg, reward)
    with torch.no_grad():
        videos = model.decode(noise)
        picked = [0, 4, 8]
        per_frame = torch.stack([reward.score(videos[:, i], PROMPTS) for i in picked], 1)
        assert torch.allclose(fn.absolute(videos, PROMPTS), per_frame.mean(1), atol=1e-6)
        images = videos[:, 4]  # images are scored as they are
        assert torch.allclose(fn.absolute(images, PROMPTS), reward.score(images, PROMPTS), atol=1e-6)
        k = torch.tensor([0.1, 0.2])
        r, parts = fn(videos, PROMPTS, "Real", "Painting", k, swap=False)
        frames_r = [fn(videos[:, i], PROMPTS, "Real", "Painting", k, swap=False)[0] for i in picked]
        assert r.shape == (2,) and torch.allclose(r, torch.stack(frames_r, 1).mean(1), atol=1e-6)
    z = noise.clone().requires_grad_(True)  # the gradient reaches the latents through the picked frames
    RewardFn(reward, frames=[0]).absolute(model.decode(z), PROMPTS).sum().backward()
    assert z.grad.abs().sum() > 0
    with pytest.raises(UserError, match="reward.frames differs"):
        mixed = load_config("tiny-wan", values={"reward": [{"name": "tiny_clip", "frames": 2},
                                                           {"name": "tiny_clip", "frames": 3}]})
        reward_function(mixed, reward)


# ---- the tiny config through the CLI -----------------------------------------------------------
def test_tiny_config_trains_through_the_cli_and_final_loads(tmp_path):
    run = tmp_path / "run"
    srpo("train", "tiny-wan", "--output", run, "--set", "log.progress=false")
    cfg = load_config("tiny-wan")
    base = load_model(cfg.model, "cpu")
    check_full_run(run, WanTransformer3DModel, base.transformer.state_dict(), steps=cfg.train.max_steps)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward"] == r["reward"] for r in rows)
    save_tiny_wan(tmp_path / "folder")  # the trained transformer in diffusers' own pipeline
    pipe = WanPipeline.from_pretrained(str(tmp_path / "folder"),
                                       transformer=WanTransformer3DModel.from_pretrained(str(run / "final")))
    pipe.set_progress_bar_config(disable=True)
    video = pipe(prompt="a red cube", height=32, width=32, num_frames=5, num_inference_steps=2,
                 max_sequence_length=base.max_sequence_length, output_type="pt").frames
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()
    assert (run / "samples" / "before.png").is_file() and (run / "samples" / "after.png").is_file()
    srpo("sample", "--model", run, "--prompt", "a lighthouse at dusk", "--steps", "3", "--output", tmp_path / "s")
    from srpo.video import read_mp4

    assert read_mp4(next((tmp_path / "s").glob("0000-*.mp4"))).shape == (5, 3, 32, 32)  # the run's 5 frames, 32 x 32
